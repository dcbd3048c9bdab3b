"""Reproduction: SparsePO vs DPO when 2 of 8 tokens carry the preference, tabular synthetic task
(arXiv 2410.05102).

  python -m alignjax.main --config=experiments/repro_sparsepo_tokens.py --workdir=workdirs/repro_sparsepo
  python -m alignjax.main --config=experiments/repro_sparsepo_tokens.py:quick --workdir=/tmp/rs

Arguments: beta, quick (one seed, few steps: seconds).
"""

from alignjax import configs
from alignjax.repro import params


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=0.5, quick=False)
    c = configs.base_config()
    c.job = "repro_sparsepo_tokens"
    # The reproduction's own parameters (alignjax/repro/params.py), read by its run(config, workdir).
    c.repro = params.defaults(c.job)
    c.repro.beta = a.beta
    if a.quick:
        c.repro.seeds, c.repro.num_prompts, c.repro.steps, c.repro.l1_levels = (0,), 8, 5, (0.03,)
    return c
