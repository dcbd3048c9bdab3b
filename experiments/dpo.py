"""DPO-family preference training: any registered pairwise loss, any model, any data source.

Launch (one host; on a TPU slice see launch/tpu_vm.sh, which runs the same command on every worker):

  python -m alignjax.main --config=experiments/dpo.py:model=tiny,loss=ipo,runlocal --workdir=workdirs/dpo
  python -m alignjax.main --config=experiments/dpo.py:model=tiny,runlocal,lora=8 --workdir=workdirs/dpo_lora
  python -m alignjax.main --config=experiments/dpo.py:loss=sigmoid,source=/data/pairs.jsonl \
      --workdir=workdirs/dpo --config.model.path=/ckpt/Qwen2.5-0.5B --config.loss.beta=0.1 \
      --config.data.tokenizer=/ckpt/Qwen2.5-0.5B --config.data.eval_fraction=0.05 \
      --config.model.compute_dtype=bfloat16 --config.model.remat=dots_no_batch   # fp32 master weights

Arguments: model (preset or HF directory), loss (a name from alignjax.losses.names(trainable=True), or
several joined by "+", e.g. sigmoid+bco_pair+sft, with --config.loss.weights="(0.8,0.2,1.0)"), module
(a .py file or module of the user's own losses, imported first: loss=my_loss,module=my_losses.py),
kind (the data kind: pairwise, step, listwise...), source (data:
a path, hf:<dataset>, ...; with it the real-data defaults hold: data.max_length 1024, evaluation only
on data.eval_source or a data.eval_fraction of it; without it the built-in arithmetic pairs),
reference (frozen | none | cache | ema), steps, lora (the LoRA rank, 0 = full fine-tuning; with LoRA the
frozen reference is the base weights with the adapters off; QLoRA: --config.model.lora.quantize=nf4),
runlocal.
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(
        arg, model="tiny", loss="sigmoid", module="", kind="pairwise", source="", reference="frozen", steps=0,
        lora=0, runlocal=False,
    )
    c = configs.base_config()
    c.model.path = a.model
    if a.source:
        c.data.source = a.source
    else:
        configs.arithmetic_data(c, "arithmetic_dpo")
    c.data.kind = a.kind
    c.reference.kind = a.reference
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 10
    c.train.num_steps = 200
    configs.fill_loss_hyperparameters(c, a.loss, a.module)
    if a.runlocal:
        configs.runlocal(c)
    if a.steps:
        c.train.num_steps = a.steps
    c.model.lora.rank = a.lora
    return c
