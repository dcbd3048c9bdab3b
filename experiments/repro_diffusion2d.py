"""Reproduction: Diffusion-DPO on a 2-D diffusion model with a preferred region (arXiv 2311.12908).

  python -m alignjax.main --config=experiments/repro_diffusion2d.py --workdir=workdirs/repro_diff
  python -m alignjax.main --config=experiments/repro_diffusion2d.py:quick --workdir=/tmp/rd

Arguments: beta, quick.
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=50.0, quick=False)
    c = configs.ConfigDict()
    c.job = "repro_diffusion2d"
    c.seeds = (0, 1, 2)
    c.num_steps = 50  # diffusion steps T
    c.batch_size = 256
    c.pretrain_steps = 3000
    c.pretrain_lr = 1e-3
    c.num_pair_samples = 4000
    c.dpo_steps = 500
    c.dpo_lr = 1e-4
    c.beta = a.beta
    c.num_eval_samples = 2000
    if a.quick:
        c.seeds = (0,)
        c.pretrain_steps, c.dpo_steps, c.batch_size = 20, 5, 32
        c.num_pair_samples, c.num_eval_samples = 200, 200
    return c
