"""Reproduction: Secrets of RLHF II (ensemble strength -> flip -> retrain) vs plain Bradley-Terry with
0-30% injected label flips, linear-reward digit pairs, tiny decoder (arXiv 2401.06080).

  python -m alignjax.main --config=experiments/repro_secrets_noise.py --workdir=workdirs/repro_secrets
  python -m alignjax.main --config=experiments/repro_secrets_noise.py:quick --workdir=/tmp/rsn

Arguments: flip_fraction, quick (one seed, one level, a few steps, the ensemble as heads: about 30 s).
"""

from alignjax import configs
from alignjax.repro import params


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, flip_fraction=0.3, quick=False)
    c = configs.base_config()
    c.job = "repro_secrets_noise"
    # The reproduction's own parameters (alignjax/repro/params.py), read by its run(config, workdir).
    c.repro = params.defaults(c.job)
    c.repro.flip_fraction = a.flip_fraction
    if a.quick:
        c.repro.seeds, c.repro.noise_levels, c.repro.num_train, c.repro.num_eval = (0,), (0.3,), 64, 64
        c.repro.steps, c.repro.ensemble_steps = 4, 2
        c.repro.ensemble = "heads"  # one ensemble run: fewer compiles
    return c
