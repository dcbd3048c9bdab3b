"""Reproduction: SparsePO vs DPO when 2 of 8 tokens carry the preference, tabular synthetic task
(arXiv 2410.05102).

  python -m alignjax.main --config=experiments/repro_sparsepo_tokens.py --workdir=workdirs/repro_sparsepo
  python -m alignjax.main --config=experiments/repro_sparsepo_tokens.py:quick --workdir=/tmp/rs

Arguments: beta, quick (one seed, few steps: seconds).
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=0.5, quick=False)
    c = configs.ConfigDict()
    c.job = "repro_sparsepo_tokens"
    c.seeds = (0, 1, 2)
    c.num_prompts = 64
    c.length = 8  # tokens per response
    c.signal_positions = 2  # the first 2 carry the reward; the other 6 are filler
    c.vocab = 8
    c.pairs_per_prompt = 16
    c.ref_scale = 1.0
    c.beta = a.beta
    c.l1_levels = (0.001, 0.01, 0.03, 0.1)  # the learned mask's L1 weight (each of lambda_u, lambda_d)
    c.steps = 300
    c.learning_rate = 20.0  # plain gradient descent on a mean over all pairs (see the module docstring)
    if a.quick:
        c.seeds, c.num_prompts, c.steps, c.l1_levels = (0,), 8, 5, (0.03,)
    return c
