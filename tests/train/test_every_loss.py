"""Every loss the preference step trains runs through ``run_train`` for a few steps.

One compile per data kind, not per loss: the losses of a kind are trained together as one mix
(``config.loss.name = "a+b+..."``), whose per-loss terms are logged as ``loss/<name>``. Each must be
finite at every step, each loss's own inputs logged (``inputs/<name>``), and the reduction
identities hold: the mix's ``loss/sigmoid`` at step 1 (equal parameters) is the DPO run's loss, and
ADPO listwise with K = 2 candidates and hard targets trains exactly as DPO (every step's loss).
"""

import json
import math

import numpy as np
import pytest

import alignjax.losses as losses
from alignjax.data import synthetic
from alignjax.losses import providers
from alignjax.train.loop import run_train
from tests.train.conftest import run_config

STEPS = 3
ROWS = 64
# Every kind's losses in one run each; together they must be every loss the step trains.
# SPO's degraded responses and Rationale-DPO's rationale are both a pair's third sequence: SPO runs
# on its own (tests/train/test_spo.py checks its loss against an independent computation).
SEPARATE = {"spo": "step"}
KIND_LOSSES = {
    "step": [n for n in losses.names(include_aliases=False, trainable=True)
             if set(losses.spec(n).status.kinds) & {"pairwise", "step"} and not losses.spec(n).stateful
             and n not in SEPARATE],
    "sft": ["sft"],
    "unpaired": ["apo_zero_unpaired", "kto"],
    "listwise": ["adpo_listwise"],
}
STATEFUL = {"bco": "unpaired"}  # a stateful loss keeps its own state: it cannot be mixed


def _pairs():
    return synthetic.records("arithmetic_dpo", "train")[:ROWS]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("every_loss")
    rng = np.random.default_rng(0)
    rows = {"step": [], "listwise": []}
    for r in _pairs():
        src = [-float(rng.uniform(0.5, 3.0)), -float(rng.uniform(0.5, 3.0))]
        visits = [int(rng.integers(1, 9)), int(rng.integers(0, 9))]
        win = [float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.0, 1.0))]  # GPO: need not sum to 1
        rows["step"].append(dict(r, source_logps=src, chosen_visits=visits[0], rejected_visits=visits[1],
                                 chosen_probs_win=win[0], chosen_probs_lose=win[1],
                                 semantic_distance=float(rng.uniform(0.0, 1.0)), rationale="1"))
        rows["listwise"].append({"prompt": r["prompt"], "candidates": [r["chosen"], r["rejected"]],
                                 "scores": [1.0, 0.0]})
    paths = {}
    for kind, recs in rows.items():
        paths[kind] = root / f"{kind}.jsonl"
        paths[kind].write_text("".join(json.dumps(x) + "\n" for x in recs))
    return paths


def _config(loss, kind, source, **loss_keys):
    c = run_config(loss, source, steps=STEPS, kind=kind, **loss_keys)
    c.data.cache_dir = "off"
    return c


def _metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def _run(tmp_path, name, loss, kind, source, **loss_keys):
    workdir = tmp_path / name
    config = _config(loss, kind, source, **loss_keys)
    config.data.rationale_template = "="  # rationale_dpo's third sequence: prompt = 1 <eos>
    run_train(config, str(workdir))
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


def test_the_kinds_cover_every_trainable_loss():
    covered = {n for names in KIND_LOSSES.values() for n in names} | set(STATEFUL) | set(SEPARATE)
    assert covered == set(losses.names(include_aliases=False, trainable=True))


@pytest.fixture(scope="module")
def dpo_rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs()))
    return _run(tmp, "dpo", "sigmoid", "pairwise", path, beta=0.1)


def test_every_pair_loss_trains_in_one_mix_and_sigmoid_equals_dpo(tmp_path, sources, dpo_rows):
    names = KIND_LOSSES["step"]
    rows = _run(tmp_path, "mix", "+".join(names), "step", sources["step"], beta=0.1, label_smoothing=1e-3)
    for r in rows:
        for name in names:
            assert math.isfinite(r[f"loss/{name}"]), (name, r)
        assert math.isfinite(r["loss"])  # (a non-finite step would have stopped the run)
    # Each loss's own inputs reach it (WPO's weights, SparsePO's KL and masks, the data's columns).
    for key in ("chosen_wpo_logps", "chosen_token_kl", "chosen_reward_mask", "source_chosen_logps",
                "chosen_visits", "chosen_win_probs", "rejected_win_probs", "semantic_distance"):
        assert math.isfinite(rows[0][f"inputs/{key}"]), key
    assert 0.0 <= rows[0]["inputs/chosen_reward_mask"] <= 1.0
    assert rows[0]["inputs/chosen_wpo_logps"] < 0.0  # log p_t < log sum_v p_v^2 on average off-policy
    # Step 1 sees the initial parameters in both runs: the mix's DPO term is the DPO run's loss.
    assert rows[0]["loss/dpo"] == pytest.approx(dpo_rows[0]["loss"], rel=1e-6)


def test_spo_trains_on_the_pair_kinds(tmp_path, sources):
    rows = _run(tmp_path, "spo", "spo", "step", sources["step"], beta=0.1)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert 0.0 <= rows[0]["inputs/degree_labels"] < 6.0  # classes 0..2 (chosen), 3..5 (rejected)


def test_adpo_listwise_with_two_candidates_and_hard_targets_trains_as_dpo(tmp_path, sources, dpo_rows):
    rows = _run(tmp_path, "adpo", "adpo_listwise", "listwise", sources["listwise"], tau=10.0,
                target_temperature=0.005)
    assert rows[0]["inputs/target_probs"] == pytest.approx(0.5)  # mean over both candidates
    for got, want in zip(rows, dpo_rows):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-5, abs=1e-6)
        assert got["nll/chosen"] == pytest.approx(want["nll/chosen"], rel=2e-5)


@pytest.mark.parametrize("kind", ["sft", "unpaired"])
def test_sft_and_unpaired_losses_train(tmp_path, kind):
    source = "synthetic:arithmetic_sft:train" if kind == "sft" else "synthetic:arithmetic_dpo:train"
    names = KIND_LOSSES[kind]
    rows = _run(tmp_path, kind, "+".join(names), kind, source)
    for r in rows:
        assert math.isfinite(r["loss"])  # (a non-finite step would have stopped the run)
        for name in names if len(names) > 1 else ():
            assert math.isfinite(r[f"loss/{name}"])
    if kind == "unpaired":
        assert 0.0 < rows[0]["inputs/labels"] < 1.0
        rows = _run(tmp_path, "bco", "bco", kind, source)
        assert all(math.isfinite(r["loss"]) for r in rows)


def test_every_declared_provider_source_is_implemented():
    from alignjax.train import step

    assert {p.source for p in providers.PROVIDERS.values()} <= set(step.SOURCES)
    assert {p.stat for p in providers.PROVIDERS.values() if p.stat} <= set(step._STATS)
