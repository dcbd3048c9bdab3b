"""PPO with a value head on the built-in arithmetic task, the verifier as reward, from an SFT model that
drops carries (alignjax/online/ppo.py; TRL 0.x's PPOTrainer loss: GAE, clipped policy and value losses,
a fixed KL penalty to the reference in the reward).

  python -m alignjax.main --config=experiments/ppo.py --workdir=workdirs/ppo
  python -m alignjax.main --config=experiments/ppo.py:runlocal --workdir=/tmp/ppo   # seconds

Arguments: seed, steps, sft_steps, prompts (per step), generations (per prompt), iterations (PPO epochs
per rollout batch), lr, kl_coef, whiten (whiten the token rewards), runlocal.
"""

from __future__ import annotations

from alignjax import configs

grpo = configs.sibling(__file__, "grpo")


def get_config(arg: str | None = None):
    a = configs.parse_arg(
        arg, seed=0, steps=60, sft_steps=2500, prompts=16, generations=4, iterations=2, lr=1e-3, kl_coef=0.05,
        whiten=False, runlocal=False,
    )
    from alignjax.online.ppo import HYPERPARAMETERS

    c = grpo.rollout_job("ppo", a)
    c.loss.name = "ppo"
    for key, value in HYPERPARAMETERS.items():
        c.loss[key] = value
    c.loss.kl_coef = a.kl_coef
    c.loss.whiten_rewards = a.whiten
    c.reference.kind = "frozen"
    if a.runlocal:
        grpo.local(c)
    return c
