"""Reproduction: MCTS step-level DPO beats instance-level DPO and the SFT model (arXiv:2405.00451) on the
built-in multi-step arithmetic task, three seeds (alignjax/repro/mcts_dpo.py; docs/reproductions.md).

  python -m alignjax.main --config=experiments/repro_mcts_dpo.py --workdir=workdirs/mcts_repro
  python -m alignjax.main --config=experiments/repro_mcts_dpo.py:quick --workdir=/tmp/mr   # one seed, tiny

experiments/mcts_dpo.py's config (its defaults are the documented run's: 3 rounds of 128 prompts, 600
SFT steps, 20 DPO steps a round, ...), run per seed of ``config.mcts_dpo.seeds`` with both methods;
its keys are set as for that file (``--config.mcts_dpo.rounds=2``). Arguments: quick (seed 0 at
experiments/mcts_dpo.py's runlocal sizes: one round of 8 prompts, a few SFT and DPO steps).
"""

from alignjax import configs

mcts_dpo = configs.sibling(__file__, "mcts_dpo")


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, quick=False)
    c = mcts_dpo.get_config("runlocal" if a.quick else None)
    c.job = "repro_mcts_dpo"
    c.mcts_dpo.seeds = (0,) if a.quick else (0, 1, 2)
    return c
