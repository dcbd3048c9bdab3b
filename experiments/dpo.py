"""DPO-family preference training: any registered pairwise loss, any model, any data source.

Launch (one host; on a TPU slice see launch/tpu_vm.sh, which runs the same command on every worker):

  python -m alignjax.main --config=experiments/dpo.py:model=tiny,loss=ipo,runlocal --workdir=workdirs/dpo
  python -m alignjax.main --config=experiments/dpo.py:loss=sigmoid --workdir=workdirs/dpo \
      --config.model.path=/ckpt/Qwen2.5-0.5B --config.data.source=/data/pairs.jsonl --config.loss.beta=0.1 \
      --config.model.compute_dtype=bfloat16 --config.model.remat=dots_no_batch   # fp32 master weights

Arguments: model (preset or HF directory), loss (a name from alignjax.losses.names()), source (data),
reference (frozen | none | cache | ema), steps, runlocal.
"""

from experiments import common


def get_config(arg: str | None = None):
    a = common.parse_arg(
        arg, model="tiny", loss="sigmoid", source="", reference="frozen", steps=0, runlocal=False
    )
    c = common.base_config()
    c.model.path = a.model
    if a.source:
        c.data.source = a.source
    c.data.kind = "pairwise"
    c.reference.kind = a.reference
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 10
    c.train.num_steps = 200
    common.fill_loss_hyperparameters(c, a.loss)
    if a.runlocal:
        common.runlocal(c)
    if a.steps:
        c.train.num_steps = a.steps
    return c
