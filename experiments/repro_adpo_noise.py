"""Reproduction: ADPO (soft targets, anchored) vs DPO with 0-40% flipped labels, tabular synthetic task.

  python -m alignjax.main --config=experiments/repro_adpo_noise.py --workdir=workdirs/repro_adpo
  python -m alignjax.main --config=experiments/repro_adpo_noise.py:quick --workdir=/tmp/ra

Arguments: beta, quick.
"""

from alignjax import configs
from alignjax.repro import params


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=0.5, quick=False)
    c = configs.base_config()
    c.job = "repro_adpo_noise"
    # The reproduction's own parameters (alignjax/repro/params.py), read by its run(config, workdir).
    c.repro = params.defaults(c.job)
    c.repro.beta = a.beta
    if a.quick:
        c.repro.seeds, c.repro.noise_levels, c.repro.num_prompts, c.repro.steps = (0,), (0.0, 0.4), 8, 5
    return c
