"""Reproduction: rejected/chosen likelihood collapse under DPO and its remedies (arXiv 2406.07327).

  python -m alignjax.main --config=experiments/repro_3d.py --workdir=workdirs/repro_3d
  python -m alignjax.main --config=experiments/repro_3d.py:quick --workdir=/tmp/r3   # seconds

The quickstart model on 2-digit addition: SFT, then from the same SFT model (also the frozen reference)
DPO, DPO with a separate (smaller) beta on the rejected term, and DPO + NLL(y_w). Arguments: beta, quick.
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, beta=0.5, quick=False)
    c = configs.ConfigDict()
    c.job = "repro_three_d"
    c.seeds = (0, 1, 2)
    c.sft_steps = 300
    c.pref_steps = 100
    c.batch_size = 64
    c.learning_rate = 1e-3
    c.num_pairs = 512
    c.losses = configs.ConfigDict({
        "dpo": dict(name="sigmoid", beta=a.beta, nll_weight=0.0),
        "dpo_split_beta": dict(name="dpo_split_beta", beta_chosen=a.beta, beta_rejected=a.beta / 4,
                               nll_weight=0.0),
        "dpo_nll": dict(name="sigmoid", beta=a.beta, nll_weight=1.0),
    })
    if a.quick:
        c.seeds = (0,)
        c.sft_steps, c.pref_steps, c.batch_size, c.num_pairs = 4, 3, 16, 128
    return c
