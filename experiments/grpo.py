"""GRPO on the built-in arithmetic task with the verifier as reward, from an SFT model that drops carries
(alignjax/jobs/online.py; "DeepSeekMath", arXiv:2402.03300, with TRL 1.16's loss aggregations).

  python -m alignjax.main --config=experiments/grpo.py --workdir=workdirs/grpo
  python -m alignjax.main --config=experiments/grpo.py:loss_type=dr_grpo,beta=0.04 --workdir=workdirs/dr_grpo
  python -m alignjax.main --config=experiments/grpo.py:runlocal --workdir=/tmp/grpo   # seconds

A learned reward instead of the verifier: ``--config.online.reward=reward_model
--config.online.reward_path=<config.reward.export_dir of experiments/reward_model.py>``.
Arguments: seed, steps, sft_steps, prompts (per step), generations (per prompt), iterations (optimiser
steps per rollout batch), lr, beta (KL coefficient, 0 = no reference), loss_type (grpo | bnpo | dr_grpo |
dapo), scale_rewards (group | batch | none), runlocal.
"""

from __future__ import annotations

from alignjax import recipes

# What rloo.py builds on (configs.sibling(__file__, "grpo")).
base = recipes.online_base
rollout_job = recipes.rollout_job
local = recipes.online_local


def get_config(arg: str | None = None):
    """``alignjax.recipes.grpo``, which the reproductions build on too."""
    return recipes.grpo(arg)
