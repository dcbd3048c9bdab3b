"""InfiFPO's source log-probs: each pair's length-normalised log-prob under N source models.

  python -m alignjax.main --config=experiments/source_logps.py:runlocal --workdir=workdirs/sources
  python -m alignjax.main \
      --config=experiments/source_logps.py:models=/ckpt/a+/ckpt/b,source=/data/pairs.jsonl \
      --workdir=workdirs/sources
  python -m alignjax.main --config=experiments/dpo.py:loss=infifpo,source=workdirs/sources/pairs.jsonl \
      --workdir=workdirs/infifpo

models: source models separated by "+" (presets, HF directories with their own tokenizers, or
training workdirs DIR[@STEP]); source: the pairs (JSONL, Parquet, hf:...); runlocal: one tiny source
on the arithmetic task's pairs. Writes <workdir>/pairs.jsonl, the pairs with their source_logps
(alignjax.eval.annotate), and summary.json.
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, models="tiny", source="", tokenizer="", runlocal=False)
    c = configs.base_config()
    c.job = "source_logps"
    c.sources.models = a.models
    if a.source:
        c.data.source = a.source
    else:
        configs.arithmetic_data(c, "arithmetic_dpo", split="train", eval_split="")
    if a.tokenizer:
        c.data.tokenizer = a.tokenizer
    if a.runlocal:
        configs.runlocal(c)
    return c
