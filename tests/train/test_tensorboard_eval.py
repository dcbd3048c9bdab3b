"""Evaluation metrics reach TensorBoard as well as ``metrics.jsonl``: the evaluations during training
and the final one, read back with TensorBoard's own event reader (or TensorFlow's, whichever is
installed), not with the writer's code."""

from __future__ import annotations

import glob
import json
import os

import pytest


def _event_scalars(tb_dir: str) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` over every event file in ``tb_dir``, by an independent reader."""
    files = sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")))
    assert files, f"no event file in {tb_dir}"
    out: dict[str, dict[int, float]] = {}
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        events = (e for path in files for e in EventFileLoader(path).Load())
    except ImportError:
        tf = pytest.importorskip("tensorflow", reason="neither tensorboard nor tensorflow is installed")
        events = (e for path in files for e in tf.compat.v1.train.summary_iterator(path))
    for event in events:
        for value in event.summary.value:
            out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_eval_metrics_reach_tensorboard(tmp_path):
    from alignjax.main import load_config_file
    from alignjax.train.loop import run_train

    c = load_config_file("experiments/dpo.py:runlocal,steps=4")
    c.model.overrides.update(
        dict(vocab_size=16, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    )
    c.data.max_length, c.data.num_eval, c.data.eval_batch_size = 10, 16, 16
    c.train.update(dict(eval_every=2, checkpoint_every=4, progress=False, tensorboard=True, plot=False))
    c.train.async_checkpoints = False
    run_train(c, str(tmp_path))

    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evals = {r["step"]: r for r in rows if "eval/ranking_accuracy" in r}
    assert sorted(evals) == [2, 4]  # one during training, the final one at the last step
    logged = _event_scalars(str(tmp_path / "tb"))
    for tag in ("eval/ranking_accuracy", "eval/nll_chosen", "loss"):
        assert tag in logged, sorted(logged)
    for step, row in evals.items():
        for tag in ("eval/ranking_accuracy", "eval/nll_chosen"):
            assert logged[tag][step] == pytest.approx(row[tag], rel=1e-6), (tag, step)
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert logged["loss"] == pytest.approx(train, rel=1e-6)


def test_two_writers_opened_in_the_same_second_keep_both_event_files(tmp_path):
    """The training writer and the final evaluation's writer (or a resumed run's) open their event
    files within a second of each other on a short run; each keeps its own file, and every scalar of
    both reaches the reader (a shared file name had truncated the first file: only the final
    evaluation's step was left)."""
    from alignjax.train.metrics import MetricWriter

    first = MetricWriter(str(tmp_path), tensorboard=True)
    first.write(1, {"loss": 0.5})
    second = MetricWriter(str(tmp_path), tensorboard=True)
    second.write(2, {"eval/ranking_accuracy": 1.0})
    first.close()
    second.close()
    logged = _event_scalars(str(tmp_path / "tb"))
    assert logged == {"loss": {1: 0.5}, "eval/ranking_accuracy": {2: 1.0}}
