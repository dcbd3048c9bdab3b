"""Reproduction: Sem-DPO vs DPO when the rater favours semantically drifted responses, tabular synthetic
task (Sem-DPO, objectives.md).

  python -m alignjax.main --config=experiments/repro_sem_dpo_drift.py --workdir=workdirs/repro_sem_dpo
  python -m alignjax.main --config=experiments/repro_sem_dpo_drift.py:quick --workdir=/tmp/rsd

Arguments: beta, quick (one seed, few steps: seconds).
"""

from alignjax import configs
from alignjax.repro import params


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=0.5, quick=False)
    c = configs.base_config()
    c.job = "repro_sem_dpo_drift"
    # The reproduction's own parameters (alignjax/repro/params.py), read by its run(config, workdir).
    c.repro = params.defaults(c.job)
    c.repro.beta = a.beta
    if a.quick:
        c.repro.seeds, c.repro.num_prompts, c.repro.steps, c.repro.alphas = (0,), 8, 5, (1.0,)
    return c
