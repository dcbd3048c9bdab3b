"""Supervised fine-tuning (NLL on completion tokens) through the same train loop as DPO.

  python -m alignjax.main --config=experiments/sft.py:runlocal --workdir=workdirs/sft
  python -m alignjax.main --config=experiments/sft.py:model=/ckpt/llama,source=/data/sft.jsonl \
      --workdir=workdirs/sft --config.data.tokenizer=/ckpt/llama
"""

from experiments import common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, model="tiny", source="", steps=0, runlocal=False)
    c = common.base_config()
    c.model.path = a.model
    if a.source:
        c.data.source = a.source
    else:
        common.arithmetic_data(c, "arithmetic_sft")
    c.data.kind = "sft"
    c.reference.kind = "none"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 10
    c.train.num_steps = 500
    common.fill_loss_hyperparameters(c, "sft")
    if a.runlocal:
        common.runlocal(c)
    if a.steps:
        c.train.num_steps = a.steps
    return c
