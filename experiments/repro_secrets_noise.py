"""Reproduction: Secrets of RLHF II (ensemble strength -> flip -> retrain) vs plain Bradley-Terry with
0-30% injected label flips, linear-reward digit pairs, tiny decoder (arXiv 2401.06080).

  python -m alignjax.main --config=experiments/repro_secrets_noise.py --workdir=workdirs/repro_secrets
  python -m alignjax.main --config=experiments/repro_secrets_noise.py:quick --workdir=/tmp/rsn

Arguments: flip_fraction, quick (one seed, one level, a few steps, the ensemble as heads: about 30 s).
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, flip_fraction=0.3, quick=False)
    c = configs.ConfigDict()
    c.job = "repro_secrets_noise"
    c.seeds = (0, 1, 2)
    c.noise_levels = (0.0, 0.15, 0.3)  # share of training labels flipped on top of BT sampling
    c.num_train = 256
    c.num_eval = 512
    c.steps = 400  # plain BT and the final Secrets-II model (50 epochs of 256 pairs at batch 32)
    c.ensemble_steps = 100  # each of the 4 ensemble members
    c.flip_fraction = a.flip_fraction  # the lowest-strength share flipped (where the ensemble mean < 0)
    c.ensemble = "models"  # 4 independently trained reward models ("heads": 4 heads on one decoder)
    c.batch_size = 32
    c.learning_rate = 3e-3
    if a.quick:
        c.seeds, c.noise_levels, c.num_train, c.num_eval = (0,), (0.3,), 64, 64
        c.steps, c.ensemble_steps, c.ensemble = 4, 2, "heads"  # one ensemble run: fewer compiles
    return c
