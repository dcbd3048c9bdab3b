"""Supervised fine-tuning (NLL on completion tokens) through the same train loop as DPO.

  python -m alignjax.main --config=experiments/sft.py:runlocal --workdir=workdirs/sft
  python -m alignjax.main --config=experiments/sft.py:model=/ckpt/llama,source=/data/sft.jsonl \
      --workdir=workdirs/sft --config.data.tokenizer=/ckpt/llama
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, model="tiny", source="", steps=0, runlocal=False)
    c = configs.base_config()
    c.model.path = a.model
    if a.source:
        c.data.source = a.source
    else:
        configs.arithmetic_data(c, "arithmetic_sft")
    c.data.kind = "sft"
    c.reference.kind = "none"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 10
    c.train.num_steps = 500
    configs.fill_loss_hyperparameters(c, "sft")
    if a.runlocal:
        configs.runlocal(c)
    if a.steps:
        c.train.num_steps = a.steps
    return c
