"""RewardBench scoring against NumPy re-implementations."""

import numpy as np
import pytest

from alignjax.eval import rewardbench


def _token_batch(seed=0):
    rng = np.random.default_rng(seed)
    rows, length, n = 6, 9, 4
    tok = rng.normal(-2.0, 1.0, (rows, length)).astype(np.float32)
    ref = rng.normal(-2.0, 1.0, (rows, length)).astype(np.float32)
    mask = (rng.random((rows, length)) < 0.7).astype(np.float32)
    ids = rng.integers(0, n, (rows, length)).astype(np.int32)
    ids[0, :3] = -1  # tokens that belong to no sequence
    mask[0, :3] = 1.0
    return tok, ref, mask, ids, n


@pytest.mark.parametrize("mode", rewardbench.IMPLICIT_REWARD_MODES)
def test_implicit_rewards_match_numpy(mode):
    tok, ref, mask, ids, n = _token_batch()
    expected = np.zeros(n)
    for i in range(n):
        sel = (ids == i) & (mask > 0)
        values = tok[sel].astype(np.float64)
        expected[i] = {
            "ref": values.sum() - ref[sel].sum(),
            "sum": values.sum(),
            "avg": values.sum() / max(sel.sum(), 1),
            "norm": -np.linalg.norm(values),
        }[mode]
    got = rewardbench.implicit_rewards(tok, mask, ids, n, ref if mode == "ref" else None, mode=mode)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_implicit_rewards_reject_bad_mode_and_missing_reference():
    tok, ref, mask, ids, n = _token_batch()
    with pytest.raises(ValueError, match="not one of"):
        rewardbench.implicit_rewards(tok, mask, ids, n, mode="mean")
    with pytest.raises(ValueError, match="reference"):
        rewardbench.implicit_rewards(tok, mask, ids, n, mode="ref")


def test_subset_accuracy_counts_ties_wrong_and_sections_use_release_weights():
    subsets = ["math-prm", "math-prm", "hep-go", "hep-go", "mt-bench-easy", "custom"]
    chosen = np.array([1.0, 1.0, 0.0, 2.0, 3.0, 1.0])
    rejected = np.array([0.0, 1.0, 1.0, 1.0, 2.0, 0.0])  # second row is a tie: wrong
    acc, counts = rewardbench.subset_accuracies(subsets, chosen, rejected)
    assert acc == {"custom": 1.0, "hep-go": 0.5, "math-prm": 0.5, "mt-bench-easy": 1.0}
    scores = rewardbench.section_scores(acc, counts)
    # Reasoning: math-prm weighted 984, hep-go 164; sections without a subset present are 0 and
    # subsets outside RewardBench's mapping count nowhere (rewardbench's calculate_scores_per_section,
    # compared on real rows in test_rewardbench_parity.py).
    assert scores == {
        "Chat": 1.0,
        "Chat Hard": 0,
        "Safety": 0,
        "Reasoning": pytest.approx((984 * 0.5 + 164 * 0.5) / (984 + 164)),
    }
