"""Ranking accuracy, the idealised bound and the Theorem 4.1 identity against NumPy."""

import numpy as np
import pytest

from alignjax.eval import ranking


def _logps(seed, n=64):
    rng = np.random.default_rng(seed)
    return [rng.normal(-20.0, 4.0, n).astype(np.float32) for _ in range(4)]


def test_ranking_accuracy_counts_ties_as_correct():
    chosen = np.array([-1.0, -2.0, -3.0, -4.0])
    rejected = np.array([-2.0, -2.0, -1.0, -5.0])
    assert float(ranking.ranking_accuracy(chosen, rejected)) == pytest.approx(0.75)


def test_reward_accuracy_counts_ties_as_wrong_and_uses_the_reference():
    s_w, s_l, r_w, r_l = _logps(0)
    expected = np.mean((s_w - r_w) - (s_l - r_l) > 0)
    assert float(ranking.reward_accuracy(s_w, s_l, r_w, r_l)) == pytest.approx(expected)
    assert float(ranking.reward_accuracy(s_w, s_w)) == 0.0


@pytest.mark.parametrize("beta", ranking.PAPER_BETAS)
@pytest.mark.parametrize("agreement", [1.0, 0.8])
def test_idealized_ranking_accuracy_matches_the_paper_formula(beta, agreement):
    _, _, r_w, r_l = _logps(1)
    a = min(agreement, 0.999)
    # the paper's form, in probabilities: pi_ref(y_w)/pi_ref(y_l) * (a/(1-a))^(1/beta) > 1
    ratio = np.exp((r_w - r_l).astype(np.float64)) * (a / (1 - a)) ** (1 / beta)
    expected = np.mean(ratio > 1)
    got = ranking.idealized_ranking_accuracy(r_w, r_l, beta=beta, agreement=agreement)
    assert float(got) == pytest.approx(expected)


def test_idealized_bound_is_one_as_beta_goes_to_zero_and_reference_accuracy_as_it_grows():
    _, _, r_w, r_l = _logps(2)
    assert float(ranking.idealized_ranking_accuracy(r_w, r_l, beta=1e-4)) == 1.0
    ref_acc = np.mean(r_w > r_l)
    assert float(ranking.idealized_ranking_accuracy(r_w, r_l, beta=1e6)) == pytest.approx(ref_acc)


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_theorem_4_1_identity_ranked_iff_dpo_loss_below_threshold(beta):
    s_w, s_l, r_w, r_l = _logps(3, n=256)
    z = beta * ((s_w - r_w) - (s_l - r_l)).astype(np.float64)
    dpo_loss = np.logaddexp(0.0, -z)  # -log sigmoid(z)
    threshold = np.asarray(ranking.dpo_ranking_threshold(r_w, r_l, beta=beta), np.float64)
    ranked = s_w >= s_l
    # away from float ties (compared on the logit scale, where saturation cannot hide them),
    # the two criteria agree pair by pair
    clear = np.abs(z - beta * (r_l - r_w)) > 1e-3
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(ranked[clear], (dpo_loss <= threshold)[clear])


def test_flipped_fraction_and_report():
    r_w = np.array([-1.0, -5.0, -5.0, -5.0])
    r_l = np.array([-2.0, -1.0, -1.0, -1.0])  # pairs 1..3 misranked by the reference
    s_w = np.array([-1.0, -1.0, -9.0, -0.5])
    s_l = np.array([-2.0, -2.0, -1.0, -3.0])  # policy fixes pairs 1 and 3
    assert float(ranking.flipped_fraction(s_w, s_l, r_w, r_l)) == pytest.approx(2 / 3)
    report = ranking.ranking_report(s_w, s_l, r_w, r_l, betas=(1.0,))
    assert report["eval/ranking_accuracy"] == pytest.approx(0.75)
    assert report["eval/ref_ranking_accuracy"] == pytest.approx(0.25)
    assert report["eval/flipped_fraction"] == pytest.approx(2 / 3)
    assert "eval/idealized_ranking_accuracy/beta=1" in report
