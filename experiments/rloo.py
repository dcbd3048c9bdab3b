"""RLOO on the built-in arithmetic task with the verifier as reward, from an SFT model that drops carries
("Back to Basics", Ahmadian et al., arXiv:2402.14740, as TRL 1.16's RLOOTrainer: leave-one-out
baseline, KL to the reference in the reward, clipped sequence-level ratio).

  python -m alignjax.main --config=experiments/rloo.py --workdir=workdirs/rloo
  python -m alignjax.main --config=experiments/rloo.py:runlocal --workdir=/tmp/rloo   # seconds

Arguments: seed, steps, sft_steps, prompts (per step), generations, iterations, lr, beta (KL-in-reward
coefficient, 0 = no reference), normalize (standardise advantages), runlocal.
"""

from __future__ import annotations

from alignjax import configs

grpo = configs.sibling(__file__, "grpo")


def get_config(arg: str | None = None):
    a = configs.parse_arg(
        arg, seed=0, steps=60, sft_steps=2500, prompts=16, generations=8, iterations=1, lr=1e-3, beta=0.05,
        normalize=False, runlocal=False,
    )
    c = grpo.rollout_job("rloo", a)
    configs.fill_loss_hyperparameters(c, "rloo")
    c.loss.beta = a.beta
    c.reference.kind = "frozen" if a.beta else "none"
    c.online.normalize_advantages = a.normalize
    if a.runlocal:
        grpo.local(c)
    return c
