"""Scoring job (issue 2): implicit rewards of a policy against a reference on built-in pairs.

  python -m alignjax.main --config=experiments/score.py:runlocal --workdir=workdirs/score
  python -m alignjax.main --config=experiments/score.py:model=/ckpt/dpo,reference=/ckpt/sft,mode=norm \
      --workdir=workdirs/score

mode (RewardBench's DPO protocol): ref (log pi - log pi_ref, the default when a reference is given),
avg (mean token log-prob, the default without one), sum (summed log-prob), norm (minus the L2 norm of
the token log-probs). The default pairs are the arithmetic task's 2,000 held-out test pairs; a
RewardBench-format file (prompt, chosen, rejected, subset) adds per-subset and section scores.
Writes summary.json in the workdir (alignjax.eval.scoring.run_score).
"""

from experiments import common

MODES = ("ref", "avg", "sum", "norm")


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, model="tiny", reference="", mode="", source="", runlocal=False)
    a.mode = a.mode or ("ref" if a.reference else "avg")
    if a.mode not in MODES:
        raise ValueError(f"experiments/score.py: mode={a.mode!r}; choose one of {list(MODES)}")
    c = common.base_config()
    c.job = "score"
    c.model.path = a.model
    c.reference.path = a.reference
    if a.source:
        c.data.source = a.source
    else:
        common.arithmetic_data(c, "arithmetic_dpo", split="test", eval_split="")
    c.score.mode = a.mode
    if a.runlocal:
        common.runlocal(c)
    return c
