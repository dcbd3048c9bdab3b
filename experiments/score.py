"""Scoring job (issue 2): implicit rewards of a policy against a reference on built-in pairs.

  python -m alignjax.main --config=experiments/score.py:runlocal --workdir=workdirs/score
  python -m alignjax.main --config=experiments/score.py:model=/ckpt/dpo,reference=/ckpt/sft,mode=norm \
      --workdir=workdirs/score

mode: ref (log pi - log pi_ref), avg (mean token log-prob), sum (summed log-prob), norm (length-normalised
implicit reward). Writes summary.json in the workdir (alignjax.eval.scoring.run_score).
"""

from experiments import common

MODES = ("ref", "avg", "sum", "norm")


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, model="tiny", reference="", mode="ref", source="", runlocal=False)
    if a.mode not in MODES:
        raise ValueError(f"experiments/score.py: mode={a.mode!r}; choose one of {list(MODES)}")
    c = common.base_config()
    c.job = "score"
    c.model.path = a.model
    c.reference.path = a.reference
    if a.source:
        c.data.source = a.source
    c.score.mode = a.mode
    if a.runlocal:
        common.runlocal(c)
    return c
