"""Reproduction: ranking accuracy after DPO vs the idealised bound (arXiv 2405.19534).

  python -m alignjax.main --config=experiments/repro_ranking.py --workdir=workdirs/repro_ranking
  python -m alignjax.main --config=experiments/repro_ranking.py:quick --workdir=/tmp/rr   # seconds

The quickstart model (2 layers, width 64) on 2-digit addition: SFT, then DPO against the SFT model;
held-out pairs scored under both. Arguments: beta, quick.
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=0.5, quick=False)
    c = configs.ConfigDict()
    c.job = "repro_ranking"
    c.seeds = (0, 1, 2)
    c.beta = a.beta
    c.sft_steps = 400
    c.pref_steps = 150
    c.batch_size = 64
    c.learning_rate = 1e-3
    c.num_pairs = 512
    if a.quick:
        c.seeds = (0,)
        c.sft_steps, c.pref_steps, c.batch_size, c.num_pairs = 4, 3, 16, 128
    return c
