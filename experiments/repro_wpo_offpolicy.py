"""Reproduction: WPO vs DPO with 0-90% off-policy pairs, synthetic token-feature policy (arXiv 2406.11827).

  python -m alignjax.main --config=experiments/repro_wpo_offpolicy.py --workdir=workdirs/repro_wpo
  python -m alignjax.main --config=experiments/repro_wpo_offpolicy.py:quick --workdir=/tmp/rw

Arguments: beta, quick (one seed, two levels, few steps: seconds).
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=0.5, quick=False)
    c = configs.ConfigDict()
    c.job = "repro_wpo_offpolicy"
    c.seeds = (0, 1, 2)
    c.rewards = ("misspecified", "linear")
    c.off_policy_levels = (0.0, 0.5, 0.9)
    c.num_prompts = 64
    c.length = 4  # tokens per response
    c.vocab = 16
    c.features = 3  # trainable numbers per prompt (d < V: the policy cannot fit every preference)
    c.pairs_per_prompt = 32
    c.ref_scale = 2.0
    c.beta = a.beta
    c.sweep_betas = (0.1, 2.0)  # on the first reward kind: E[r] gain against KL
    c.steps = 300
    c.learning_rate = 0.05
    if a.quick:
        c.seeds, c.off_policy_levels, c.num_prompts, c.steps = (0,), (0.0, 0.9), 8, 5
        c.sweep_betas = (2.0,)
    return c
