"""Reproduction: ADPO (soft targets, anchored) vs DPO with 0-40% flipped labels, tabular synthetic task.

  python -m alignjax.main --config=experiments/repro_adpo_noise.py --workdir=workdirs/repro_adpo
  python -m alignjax.main --config=experiments/repro_adpo_noise.py:quick --workdir=/tmp/ra

Arguments: beta, quick.
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=0.5, quick=False)
    c = configs.ConfigDict()
    c.job = "repro_adpo_noise"
    c.seeds = (0, 1, 2)
    c.noise_levels = (0.0, 0.1, 0.2, 0.3, 0.4)
    c.num_prompts = 64
    c.num_responses = 8
    c.pairs_per_prompt = 12
    c.score_noise = 0.5  # the scorer behind ADPO's soft targets: s = r + 0.5 xi
    c.temperature = 0.5  # q = sigmoid((s_w - s_l) / T)
    c.beta = a.beta
    c.steps = 400
    c.learning_rate = 0.05
    c.anchor_every = 50
    if a.quick:
        c.seeds, c.noise_levels, c.num_prompts, c.steps = (0,), (0.0, 0.4), 8, 5
    return c
