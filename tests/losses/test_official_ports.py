"""Losses against ports (torch) of their authors' official loss code, on random logits and labels.

Each ``official_*`` function re-expresses the loss path of the named file and commit: from logits
[2B, T, V] and labels (-100 = not scored), chosen rows first, as those trainers concatenate them. The
alignjax side gets its arrays from the same logits through alignjax's own helpers where they exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignjax import losses
from alignjax.losses import modifiers, pairwise, reference_free

B, T, V = 6, 9, 13


def _logits_labels(seed: int, peaked: bool = False):
    """Random logits and labels; ``peaked`` makes the labelled tokens likely, so WPO's weights exceed 1."""
    r = np.random.default_rng(seed)
    logits = r.normal(0, 1.5, (2 * B, T, V)).astype(np.float32)
    labels = r.integers(0, V, (2 * B, T))
    if peaked:
        half = np.arange(B // 2)  # both responses of the first pairs become near-greedy tokens
        rows = np.concatenate([half, B + half])
        for i in rows:
            logits[i, np.arange(T - 1), labels[i, 1:]] = 8.0
    start = r.integers(1, T - 1, 2 * B)  # prompt tokens before `start` are not scored
    labels = np.where(np.arange(T)[None] >= start[:, None], labels, -100)
    return logits, labels


def _token_logps(logits, labels):
    """alignjax side: per-token log-probs and masks of the shifted labels [2B, T-1]."""
    z, y = jnp.asarray(logits[:, :-1]), labels[:, 1:]
    mask = (y != -100).astype(np.float32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(z, -1), np.where(y == -100, 0, y)[..., None], -1)[..., 0]
    return lp * mask, mask, z


def official_wpo(logits, labels, ref_chosen, ref_rejected, *, beta, label_smoothing):
    """wzhouad/WPO scripts/run_wpo.py (commit 3353ef6): ``WPOTrainer.get_batch_logps`` (summed log-probs
    and the detached pair weight clamp(exp(mean_t(log p_t - log sum_v p_v^2))_w * ..._l, max=1)) and
    ``dpo_loss`` (label-smoothed DPO times the weight)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != -100
    labels[labels == -100] = 0
    per_token = torch.gather(F.log_softmax(logits, -1), 2, labels[..., None])[..., 0]
    logps = (per_token * loss_mask).sum(-1)
    aligned = per_token - torch.log((F.softmax(logits, -1) ** 2).sum(-1))
    avg = (aligned * loss_mask).sum(-1) / loss_mask.sum(-1)
    weight = torch.clamp(torch.exp(avg[:B] + avg[B:]), max=1).detach()
    z = (logps[:B] - logps[B:]) - (ref_chosen - ref_rejected)
    return (-F.logsigmoid(beta * z) * (1 - label_smoothing) * weight
            - F.logsigmoid(-beta * z) * label_smoothing * weight), weight


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_wpo_matches_official(label_smoothing):
    logits, labels = _logits_labels(0, peaked=True)
    r = np.random.default_rng(1)
    ref = r.normal(-25, 3, 2 * B).astype(np.float32)
    want, weight = official_wpo(torch.tensor(logits), torch.tensor(labels), torch.tensor(ref[:B]),
                                torch.tensor(ref[B:]), beta=0.1, label_smoothing=label_smoothing)
    assert (weight == 1).any() and (weight < 1).any()  # both sides of the clamp are exercised
    lp, mask, z = _token_logps(logits, labels)
    aligned = modifiers.wpo_aligned_logps(lp, modifiers.log_sum_sq_probs(z), mask)
    s = lp.sum(-1)
    got = losses.get("wpo")(s[:B], s[B:], ref[:B], ref[B:], aligned[:B], aligned[B:], beta=0.1,
                            label_smoothing=label_smoothing)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def official_simpo(logits, labels, *, beta, gamma_beta_ratio, label_smoothing):
    """princeton-nlp/SimPO scripts/simpo_trainer.py (commit 15c4ff8): ``get_batch_logps`` with
    ``average_log_prob=True`` and ``simpo_loss`` (sigmoid): logits = avg_w - avg_l - gamma_beta_ratio,
    label-smoothed log-sigmoid of beta * logits."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != -100
    labels[labels == -100] = 0
    per_token = torch.gather(logits.log_softmax(-1), 2, labels[..., None])[..., 0]
    avg = (per_token * loss_mask).sum(-1) / loss_mask.sum(-1)
    x = avg[:B] - avg[B:] - gamma_beta_ratio
    return -F.logsigmoid(beta * x) * (1 - label_smoothing) - F.logsigmoid(-beta * x) * label_smoothing


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_matches_official(label_smoothing):
    """alignjax's gamma is the margin in units of z (TRL's ``simpo_gamma``): gamma = beta * the official
    gamma_beta_ratio."""
    logits, labels = _logits_labels(2)
    beta, ratio = 2.5, 0.55
    want = official_simpo(torch.tensor(logits), torch.tensor(labels), beta=beta, gamma_beta_ratio=ratio,
                          label_smoothing=label_smoothing)
    lp, mask, _ = _token_logps(logits, labels)
    s, n = lp.sum(-1), mask.sum(-1)
    got = reference_free.simpo(s[:B], s[B:], n[:B], n[B:], beta=beta, gamma=beta * ratio,
                               label_smoothing=label_smoothing)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_rationale_dpo_is_dpo_plus_weighted_rationale_nll():
    """The rationale term is the rationale's token NLL (torch cross-entropy, summed) times gamma."""
    logits, labels = _logits_labels(3)
    z, y = torch.tensor(logits[:B, :-1]).reshape(-1, V), torch.tensor(labels[:B, 1:]).reshape(-1)
    nll = F.cross_entropy(z, y, ignore_index=-100, reduction="none").reshape(B, -1).sum(-1).numpy()
    lp, _, _ = _token_logps(logits[:B], labels[:B])
    r = np.random.default_rng(4)
    pair = [jnp.asarray(-r.uniform(5, 30, B), jnp.float32) for _ in range(4)]
    gamma = 0.3
    got = modifiers.rationale_dpo(*pair, lp.sum(-1), rationale_gamma=gamma)
    np.testing.assert_allclose(got - pairwise.dpo(*pair), gamma * nll, rtol=1e-5, atol=1e-5)
    # A supervised term: d loss / d log pi(r) = -gamma whatever the rationale's likelihood.
    g = jax.grad(lambda x: jnp.sum(modifiers.rationale_dpo(*pair, x, rationale_gamma=gamma)))(lp.sum(-1))
    np.testing.assert_allclose(g, np.full(B, -gamma), rtol=1e-6)
