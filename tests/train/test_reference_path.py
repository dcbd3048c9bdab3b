"""``config.reference.path``: DPO against a frozen reference loaded from its own HF directory."""

import json

import pytest

from alignjax.train.loop import reference_from_path, run_train
from tests import hf_fixtures
from tests.train.test_loop import _inprocess_config


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two Llamas of one architecture and tokenizer (different weights), and TRL-format pairs."""
    root = tmp_path_factory.mktemp("two")
    a = hf_fixtures.save_checkpoint(str(root / "a"), seed=0)
    b = hf_fixtures.save_checkpoint(str(root / "b"), seed=1)
    return a, b, hf_fixtures.write_pairs(str(root / "pairs.jsonl"), 32)


def _config(policy, reference, pairs):
    c = _inprocess_config(train__num_steps=1)
    c.model.path, c.data.tokenizer, c.reference.path = policy, policy, reference
    c.data.source, c.data.eval_source, c.data.eval_fraction, c.data.max_length = pairs, "", 0.0, 32
    return c


def _first_step(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return json.loads(f.readline())


def test_swapping_policy_and_reference_negates_the_first_rewards(two_checkpoints, tmp_path):
    """DPO's implicit rewards are beta (log pi - log pi_ref): with A's weights as policy and B's as
    reference the first step's rewards are the negation of B's against A, and not the zeros of a
    reference copied from the policy (which an ignored ``reference.path`` gives)."""
    a, b, pairs = two_checkpoints
    run_train(_config(a, b, pairs), str(tmp_path / "a_vs_b"))
    run_train(_config(b, a, pairs), str(tmp_path / "b_vs_a"))
    forward, swapped = _first_step(tmp_path / "a_vs_b"), _first_step(tmp_path / "b_vs_a")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert forward[key] != 0.0, key
        assert forward[key] == pytest.approx(-swapped[key], rel=1e-6, abs=1e-9), key


def test_a_reference_that_cannot_serve_is_refused_in_one_line(two_checkpoints, tmp_path):
    a, _, pairs = two_checkpoints
    hf_fixtures.save_llama(str(tmp_path / "wider"), vocab_size=640)
    (tmp_path / "sft_run").mkdir()
    (tmp_path / "sft_run" / "config.json").write_text(json.dumps({"job": "train"}))
    cases = [
        (dict(path="tiny"), r"config.reference.path='tiny' is a preset"),
        (dict(path=str(tmp_path / "sft_run")), r"is a training workdir; export it first"),
        (dict(path=str(tmp_path / "wider")), r"not shaped like the policy's"),
    ]
    for changes, message in cases:
        c = _config(a, a, pairs)
        c.reference.update(changes)
        with pytest.raises(ValueError, match=message):
            run_train(c, str(tmp_path / "run"))
    c = _config(a, a, pairs)
    c.reference.kind = "none"  # a reference-free loss's run; the check comes before any model is read
    with pytest.raises(ValueError, match=r"config.reference.kind='none' runs no reference"):
        reference_from_path(c, policy=None, mesh=None, rules=None, vocab_size=0, heads=())
