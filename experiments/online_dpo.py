"""Online (iterative) DPO on the built-in arithmetic task: rounds of sampling from the current policy,
scoring with the verifier (or a reward model), pairing and DPO (alignjax/jobs/online.py).

  python -m alignjax.main --config=experiments/online_dpo.py --workdir=workdirs/online_dpo
  python -m alignjax.main --config=experiments/online_dpo.py:pairs=all,reference=refresh \\
      --workdir=workdirs/online_dpo_all
  python -m alignjax.main --config=experiments/online_dpo.py:runlocal --workdir=/tmp/online_dpo   # seconds
  python -m alignjax.main --config=experiments/online_dpo.py:augmented --workdir=workdirs/online_dpo_ra

Arguments: seed, rounds, prompts (per round), generations, sft_steps, dpo_steps (per round), loss (any
pairwise loss), beta, nll (the chosen answers' NLL weight, RPO), lr, pairs (best_worst | all), reference
(fixed | refresh), augmented (reward-augmented relabelling of each round's pairs, arXiv:2410.08067),
runlocal.
"""

from __future__ import annotations

from alignjax import recipes


def get_config(arg: str | None = None):
    """``alignjax.recipes.online_dpo``, which the reproductions build on too."""
    return recipes.online_dpo(arg)
