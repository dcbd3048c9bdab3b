"""Scoring job: implicit rewards of a policy against a reference, RewardBench's DPO protocol.

  python -m alignjax.main --config=experiments/score.py:runlocal --workdir=workdirs/score
  python -m alignjax.main --config=experiments/score.py:model=/ckpt/dpo,reference=/ckpt/sft,mode=norm \
      --workdir=workdirs/score
  python -m alignjax.main --config=experiments/score.py:model=workdirs/dpo@100,source=rewardbench.jsonl \
      --workdir=workdirs/score

model / reference: a preset, an HF directory, or a training workdir (its latest checkpoint, or
DIR@STEP). mode (RewardBench's DPO protocol): ref (log pi - log pi_ref summed, the default when a
reference is given), avg (mean token log-prob, the default without one), sum (summed log-prob), norm
(minus the L2 norm of the token log-probs). source: a RewardBench-format file (prompt, chosen,
rejected, subset), tokenized as RewardBench's DPO scorer does (chat template, BOS/EOS, its
truncation: alignjax.eval.rewardbench) unless tokenization=trl; per-subset and section scores. The
default pairs are the arithmetic task's 2,000 held-out test pairs (tokenization=trl: the arithmetic
tokenizer has no chat template). tokenizer: default the workdir's data.tokenizer, or the model
directory when it has tokenizer.json. Writes summary.json and scores.jsonl in the workdir
(alignjax.jobs.score).
"""

import json
import os

from alignjax import configs

MODES = ("ref", "avg", "sum", "norm")
TOKENIZATIONS = ("rewardbench", "trl")


def default_tokenizer(model: str) -> str:
    """The tokenizer that goes with ``model``: a workdir's ``data.tokenizer``, an HF directory itself
    when it holds tokenizer.json, else "" (keep the config's)."""
    path = model.rpartition("@")[0] if model.rpartition("@")[2].isdigit() else model
    config = os.path.join(path, "config.json")
    if os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(config):
        with open(config) as f:
            return json.load(f).get("data", {}).get("tokenizer", "")
    return path if os.path.isfile(os.path.join(path, "tokenizer.json")) else ""


def get_config(arg: str | None = None):
    a = configs.parse_arg(
        arg, model="tiny", reference="", mode="", source="", tokenizer="", tokenization="", runlocal=False
    )
    a.mode = a.mode or ("ref" if a.reference else "avg")
    if a.mode not in MODES:
        raise ValueError(f"experiments/score.py: mode={a.mode!r}; choose one of {list(MODES)}")
    a.tokenization = a.tokenization or ("rewardbench" if a.source else "trl")
    if a.tokenization not in TOKENIZATIONS:
        raise ValueError(
            f"experiments/score.py: tokenization={a.tokenization!r}; choose one of {list(TOKENIZATIONS)}"
        )
    c = configs.base_config()
    c.job = "score"
    c.model.path = a.model
    c.reference.path = a.reference
    if a.source:
        c.data.source = a.source
    else:
        configs.arithmetic_data(c, "arithmetic_dpo", split="test", eval_split="")
    c.data.tokenizer = a.tokenizer or default_tokenizer(a.model) or c.data.tokenizer
    c.score.mode = a.mode
    c.score.tokenization = a.tokenization
    if a.runlocal:
        configs.runlocal(c)
    return c
