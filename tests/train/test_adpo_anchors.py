"""ADPO's anchors ("Anchored Direct Preference Optimization"): the reference, an EMA of the policy,
or the previous policy, all set by ``config.reference`` (kind ``frozen``; ``ema`` with alpha < 1;
``ema`` with ``sync_every=1, alpha=1``, the policy before each update).

Anchored to the previous policy, every step's anchored scores s - s_anc are 0, so ADPO's listwise
loss is KL(q || uniform) whatever the parameters: computed here from the scores alone, it must be
every step's loss while the policy moves; a frozen reference leaves that value after step 1.
"""

import json

import numpy as np
import pytest

from alignjax.data import synthetic
from alignjax.train.loop import data_iterator, run_train
from tests.train.conftest import run_config

K, ROWS, STEPS, T = 3, 32, 3, 0.5


def _rows():
    rng = np.random.default_rng(0)
    recs = synthetic.records("arithmetic_dpo", "train")[:ROWS]
    return [{"prompt": r["prompt"], "candidates": [r["chosen"], r["rejected"], r["chosen"] + "0"],
             "scores": rng.normal(0, 1, K).round(3).tolist()} for r in recs]


def _kl_to_uniform(scores):
    s = np.asarray(scores, np.float64)
    z = (s - s.mean(-1, keepdims=True)) / np.maximum(s.std(-1, keepdims=True), 1e-6) / T
    q = np.exp(z - z.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    return (q * (np.log(q) + np.log(K))).sum(-1)


def _config(tmp_path, **reference):
    source = tmp_path / "listwise.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    config = run_config("adpo_listwise", source, steps=STEPS, kind="listwise", tau=1.0, target_temperature=T)
    config.data.cache_dir = "off"
    config.optim.learning_rate = 1e-2
    config.reference.update(reference)
    return config


def _run(tmp_path, name, **reference):
    run_train(_config(tmp_path, **reference), str(tmp_path / name))
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_previous_policy_anchor_makes_every_step_kl_to_uniform(tmp_path):
    rows = _run(tmp_path, "previous", kind="ema", sync_every=1, alpha=1.0)
    config = _config(tmp_path)
    data, _ = data_iterator(config, config.data.source, config.data.batch_size)
    want = [_kl_to_uniform(next(data)["scores"]).mean() for _ in range(STEPS)]  # the run's batches
    np.testing.assert_allclose([r["loss"] for r in rows], want, rtol=2e-5)
    assert rows[0]["grad_norm"] > 0 and rows[-1]["grad_norm"] > 0  # the policy still moves
    frozen = _run(tmp_path, "frozen", kind="frozen")
    assert frozen[0]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-6)  # both anchors = the initial policy
    assert abs(frozen[-1]["loss"] - rows[-1]["loss"]) > 1e-4  # the frozen anchor stays behind
