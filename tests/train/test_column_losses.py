"""Losses whose inputs are per-example data columns: GPO's win probabilities, Sem-DPO's distance.

The columns go JSONL -> validation -> tokenization -> (the on-disk cache) -> batch -> provider ->
loss. The step's loss equals the registered loss applied to the batch's columns and to log-probs
computed here independently in NumPy; a run trains through ``run_train`` with the data cache on;
data without the columns is refused before the step compiles, naming the column.
"""

import json
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import alignjax.losses as losses
from alignjax.data import PreferenceData, synthetic
from alignjax.losses import providers
from alignjax.train import step as steplib
from alignjax.train.loop import data_iterator, run_train
from tests.train.conftest import run_config, small_model
from tests.train.test_step import _np_seq_logps

ROWS = 32
B = 8
COLUMNS = ("chosen_probs_win", "chosen_probs_lose", "semantic_distance")


def _records():
    rng = np.random.default_rng(3)
    out = []
    for r in synthetic.records("arithmetic_dpo", "train")[:ROWS]:
        pw, pl = rng.uniform(0.0, 1.0, 2)  # two win probabilities against the policy: need not sum to 1
        out.append(dict(r, chosen_probs_win=float(pw), chosen_probs_lose=float(pl),
                        semantic_distance=float(rng.uniform(0.0, 1.5))))
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("columns") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    return path


def _data(path, **kw):
    return PreferenceData(str(path), "arithmetic", kind="pairwise", batch_size=B, max_length=10,
                          buckets=(10,), seed=0, process_index=0, process_count=1, **kw)


def test_batches_carry_each_rows_columns(source):
    recs = _records()
    data = _data(source, shuffle=False)
    host = next(data)
    lines = [int(e.where.rsplit(":", 1)[1]) for e in data.examples[:B]]
    for col in COLUMNS:
        want = np.array([recs[n - 1][col] for n in lines], np.float32)
        np.testing.assert_array_equal(host[col], want, err_msg=col)


@pytest.mark.parametrize("loss", ["gpo_square", "sem_dpo"])
def test_step_loss_is_the_loss_of_the_batch_columns(source, loss):
    model = small_model()
    params, ref_params = model.init(jax.random.PRNGKey(1)), model.init(jax.random.PRNGKey(2))
    host = next(_data(source))
    config = ml_collections.ConfigDict(dict(loss=dict(name=loss, beta=0.5), data=dict(kind="pairwise"),
                                            train=dict(nan_at_step=-1)))
    spec = steplib.make_step_spec(config, B, "model")
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    got, (metrics, _) = jax.jit(steplib.make_loss_fn(model, spec))(params, ref_params, None, batch)

    pol = _np_seq_logps(model.apply(params, batch["input_ids"]), host, 2 * B)
    ref = _np_seq_logps(model.apply(ref_params, batch["input_ids"]), host, 2 * B)
    args = dict(chosen_logps=pol[:B], rejected_logps=pol[B:], ref_chosen_logps=ref[:B],
                ref_rejected_logps=ref[B:])
    if loss == "gpo_square":
        args.update(chosen_win_probs=host["chosen_probs_win"], rejected_win_probs=host["chosen_probs_lose"])
    else:
        args.update(semantic_distance=host["semantic_distance"])
    want = np.mean(losses.get(loss)(**{k: jnp.asarray(v, jnp.float32) for k, v in args.items()}, beta=0.5))
    np.testing.assert_allclose(got, want, rtol=2e-5)
    for name in losses.spec(loss).required[4:]:
        col = providers.PROVIDERS[name].column
        np.testing.assert_allclose(metrics[f"inputs/{name}"], host[col].mean(), rtol=1e-6)


def _config(loss, path, steps=3):
    return run_config(loss, path, steps=steps)


def test_gpo_and_sem_dpo_train_from_cached_columns(tmp_path, source):
    """Both losses, mixed, train 3 steps from the on-disk cache; at step 1 the policy is the
    reference, so each term is a function of the first batch's columns alone."""
    config = _config("gpo_square+sem_dpo", source)
    config.loss.update(dict(beta=0.1, sem_alpha=2.0))
    workdir = tmp_path / "run"
    run_train(config, str(workdir))
    rows = [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (workdir / "data_cache").is_dir()

    first, _ = data_iterator(config, str(source), config.data.batch_size, workdir=str(workdir))
    host = next(first)  # the batch step 1 trained on (same seed, now read from the cache)
    pw, pl, d = (host[c].astype(np.float64) for c in COLUMNS)
    gpo = np.mean(((pw - 0.5) / 0.1) ** 2 + ((pl - 0.5) / 0.1) ** 2)
    sem = np.mean(np.log(2.0) * np.exp(-2.0 * d))
    assert rows[0]["loss/gpo_square"] == pytest.approx(gpo, rel=1e-5)
    assert rows[0]["loss/sem_dpo"] == pytest.approx(sem, rel=1e-5)
    assert rows[0]["inputs/chosen_win_probs"] == pytest.approx(pw.mean(), rel=1e-6)
    assert rows[0]["inputs/semantic_distance"] == pytest.approx(d.mean(), rel=1e-6)


def test_data_without_the_columns_is_refused_naming_the_column(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in synthetic.records("arithmetic_dpo", "train")[:16]))
    for loss, column in (("gpo_square", "chosen_probs_win"), ("sem_dpo", "semantic_distance")):
        config = _config(loss, plain, steps=1)
        config.data.cache_dir = "off"
        with pytest.raises(
            ValueError,
            match=rf"config.loss.name={loss!r} reads the data column\(s\) \[{column!r}.*\], which the rows "
            rf"of config.data.source={plain} do not carry",
        ):
            run_train(config, str(tmp_path / loss))
        assert not (tmp_path / loss / "checkpoints").exists()  # refused before the model was built


def test_a_column_on_some_rows_only_names_the_first_row_without_it(tmp_path):
    recs = _records()[:B]
    del recs[3]["chosen_probs_lose"]
    path = tmp_path / "some.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError, match=rf"field 'chosen_probs_lose' is present on some rows but missing "
                       rf"at {path}:4; give it on every row or on none"):
        next(_data(path, shuffle=False))


@pytest.mark.parametrize(
    "field,value,problem",
    [
        ("chosen_probs_win", 1.5, "field 'chosen_probs_win' must be a probability in [0, 1], got 1.5"),
        ("chosen_probs_lose", "0.3", "field 'chosen_probs_lose' must be a number, got str"),
        ("semantic_distance", -0.1, "field 'semantic_distance' must be a finite distance >= 0, got -0.1"),
    ],
)
def test_a_bad_column_value_names_file_and_line(tmp_path, field, value, problem):
    recs = _records()[:B]
    recs[5][field] = value
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}:6: {problem}") + "$"):
        next(_data(path))


def test_bco_weighs_undesirable_rows_by_the_prompt_classifiers_density_ratio(tmp_path):
    """BCO's underlying-distribution matching: at step 1 (policy = reference, so r = delta = 0) the
    desirable rows' loss is log 2 and the undesirable rows' is w log 2, w = TRL's UDM weight
    ``(p / (1 - p + 1e-8)).clamp(min_density_ratio, max_density_ratio)`` of the row's classifier
    probability; config.loss.max_density_ratio reaches the provider."""
    rng = np.random.default_rng(5)
    recs = [dict(r, prompt_desirable_prob=float(rng.uniform(0.05, 0.95)))
            for r in synthetic.records("arithmetic_dpo", "train")[:ROWS]]
    path = tmp_path / "udm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    config = _config("bco", path, steps=1)
    config.data.kind = "unpaired"
    config.loss.max_density_ratio = 3.0
    workdir = tmp_path / "run"
    run_train(config, str(workdir))
    (row,) = _metrics_rows(workdir)
    first, _ = data_iterator(config, str(path), config.data.batch_size, workdir=str(workdir))
    host = next(first)
    p = host["prompt_desirable_prob"].astype(np.float64)
    w = np.clip(p / (1 - p + 1e-8), 0.5, 3.0)
    want = np.mean(np.where(host["label"], 1.0, w) * np.log(2.0))
    assert row["loss"] == pytest.approx(want, rel=1e-5)
    assert w.max() == 3.0 and w.min() == 0.5  # both clamps are hit by this batch


def _metrics_rows(workdir):
    return [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r]
