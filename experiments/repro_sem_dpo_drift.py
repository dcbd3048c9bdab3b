"""Reproduction: Sem-DPO vs DPO when the rater favours semantically drifted responses, tabular synthetic
task (Sem-DPO, objectives.md).

  python -m alignjax.main --config=experiments/repro_sem_dpo_drift.py --workdir=workdirs/repro_sem_dpo
  python -m alignjax.main --config=experiments/repro_sem_dpo_drift.py:quick --workdir=/tmp/rsd

Arguments: beta, quick (one seed, few steps: seconds).
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=0.5, quick=False)
    c = configs.ConfigDict()
    c.job = "repro_sem_dpo_drift"
    c.seeds = (0, 1, 2)
    c.num_prompts = 64
    c.num_responses = 8
    c.pairs_per_prompt = 24
    c.embed_dim = 16
    c.embed_noise = 0.5
    c.drift_share = 0.3  # responses on another topic
    c.drift_bonus = 1.0  # the rater's score bonus for a drifted response
    c.beta = a.beta
    c.alphas = (1.0, 5.0)  # sem_alpha (the library default is 1.0)
    c.steps = 400
    c.learning_rate = 0.05
    if a.quick:
        c.seeds, c.num_prompts, c.steps, c.alphas = (0,), 8, 5, (1.0,)
    return c
