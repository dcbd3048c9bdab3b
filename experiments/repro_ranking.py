"""Reproduction: ranking accuracy after DPO vs the idealised bound (arXiv 2405.19534).

  python -m alignjax.main --config=experiments/repro_ranking.py --workdir=workdirs/repro_ranking
  python -m alignjax.main --config=experiments/repro_ranking.py:quick --workdir=/tmp/rr   # seconds

The quickstart model (2 layers, width 64) on 2-digit addition: SFT, then DPO against the SFT model;
held-out pairs scored under both. Arguments: beta, quick.
"""

from alignjax import configs
from alignjax.repro import params


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=0.5, quick=False)
    c = configs.base_config()
    c.job = "repro_ranking"
    # The reproduction's own parameters (alignjax/repro/params.py), read by its run(config, workdir).
    c.repro = params.defaults(c.job)
    c.repro.beta = a.beta
    if a.quick:
        c.repro.seeds = (0,)
        c.repro.sft_steps, c.repro.pref_steps, c.repro.batch_size, c.repro.num_pairs = 4, 3, 16, 128
    return c
