"""Reproduction: rejected/chosen likelihood collapse under DPO and its remedies (arXiv 2406.07327).

  python -m alignjax.main --config=experiments/repro_3d.py --workdir=workdirs/repro_3d
  python -m alignjax.main --config=experiments/repro_3d.py:quick --workdir=/tmp/r3   # seconds

The quickstart model on 2-digit addition: SFT, then from the same SFT model (also the frozen reference)
DPO, DPO with a separate (smaller) beta on the rejected term, and DPO + NLL(y_w). Arguments: beta, quick.
"""

from alignjax import configs
from alignjax.repro import params


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=0.5, quick=False)
    c = configs.base_config()
    c.job = "repro_three_d"
    # The reproduction's own parameters (alignjax/repro/params.py), read by its run(config, workdir).
    c.repro = params.defaults(c.job)
    c.repro.losses = params.three_d_losses(a.beta)
    if a.quick:
        c.repro.seeds = (0,)
        c.repro.sft_steps, c.repro.pref_steps, c.repro.batch_size, c.repro.num_pairs = 4, 3, 16, 128
    return c
