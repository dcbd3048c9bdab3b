"""PPO with a value head on the built-in arithmetic task, the verifier as reward, from an SFT model that
drops carries (alignjax/online/ppo.py; TRL 0.x's PPOTrainer loss: GAE, clipped policy and value losses,
a fixed KL penalty to the reference in the reward).

  python -m alignjax.main --config=experiments/ppo.py --workdir=workdirs/ppo
  python -m alignjax.main --config=experiments/ppo.py:runlocal --workdir=/tmp/ppo   # seconds

Arguments: seed, steps, sft_steps, prompts (per step), generations (per prompt), iterations (PPO epochs
per rollout batch), lr, kl_coef, whiten (whiten the token rewards), runlocal.
"""

from __future__ import annotations

from alignjax import recipes


def get_config(arg: str | None = None):
    """``alignjax.recipes.ppo``, which the reproductions build on too."""
    return recipes.ppo(arg)
