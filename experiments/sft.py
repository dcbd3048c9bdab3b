"""Supervised fine-tuning (NLL on completion tokens) through the same train loop as DPO.

  python -m alignjax.main --config=experiments/sft.py:runlocal --workdir=workdirs/sft
  python -m alignjax.main --config=experiments/sft.py:model=/ckpt/llama --workdir=workdirs/sft \
      --config.data.source=/data/sft.jsonl
"""

from experiments import common


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, model="tiny", source="", steps=0, runlocal=False)
    c = common.base_config()
    c.model.path = a.model
    if a.source:
        c.data.source = a.source
    c.data.kind = "sft"
    c.data.source = c.data.source if a.source else "synthetic:arithmetic_sft:train"
    c.data.eval_source = "synthetic:arithmetic_sft:val"
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
