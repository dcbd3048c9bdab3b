"""Reproduction: WPO vs DPO with 0-90% off-policy pairs, synthetic token-feature policy (arXiv 2406.11827).

  python -m alignjax.main --config=experiments/repro_wpo_offpolicy.py --workdir=workdirs/repro_wpo
  python -m alignjax.main --config=experiments/repro_wpo_offpolicy.py:quick --workdir=/tmp/rw

Arguments: beta, quick (one seed, two levels, few steps: seconds).
"""

from alignjax import configs
from alignjax.repro import params


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=0.5, quick=False)
    c = configs.base_config()
    c.job = "repro_wpo_offpolicy"
    # The reproduction's own parameters (alignjax/repro/params.py), read by its run(config, workdir).
    c.repro = params.defaults(c.job)
    c.repro.beta = a.beta
    if a.quick:
        c.repro.seeds, c.repro.off_policy_levels, c.repro.num_prompts, c.repro.steps = (0,), (0.0, 0.9), 8, 5
        c.repro.sweep_betas = (2.0,)
    return c
