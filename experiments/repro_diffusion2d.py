"""Reproduction: Diffusion-DPO on a 2-D diffusion model with a preferred region (arXiv 2311.12908).

  python -m alignjax.main --config=experiments/repro_diffusion2d.py --workdir=workdirs/repro_diff
  python -m alignjax.main --config=experiments/repro_diffusion2d.py:quick --workdir=/tmp/rd

Arguments: beta, quick.
"""

from alignjax import configs
from alignjax.repro import params


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=50.0, quick=False)
    c = configs.base_config()
    c.job = "repro_diffusion2d"
    # The reproduction's own parameters (alignjax/repro/params.py), read by its run(config, workdir).
    c.repro = params.defaults(c.job)
    c.repro.beta = a.beta
    if a.quick:
        c.repro.seeds = (0,)
        c.repro.pretrain_steps, c.repro.dpo_steps, c.repro.batch_size = 20, 5, 32
        c.repro.num_pair_samples, c.repro.num_eval_samples = 200, 200
    return c
