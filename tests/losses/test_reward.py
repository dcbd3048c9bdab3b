"""Reward-model objectives (Bradley-Terry, Secrets-II, GPM, PAL) against NumPy formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from alignjax.losses import registry
from alignjax.losses.reward import (
    bradley_terry,
    gpm,
    gpm_score,
    pal,
    pal_ideal_point,
    pal_reward,
    preference_strength,
    secrets_rm,
    strength_thresholds,
)


def np_nls(x):  # -log sigmoid(x)
    return np.logaddexp(0.0, -x)


def np_smoothed(z, eps):
    return (1 - eps) * np_nls(z) + eps * np_nls(-z)


@pytest.fixture(scope="module")
def rw():
    rng = np.random.default_rng(0)
    return rng.normal(0, 2, 6), rng.normal(0, 2, 6), rng.uniform(0, 1, 6)


# ------------------------------------------------------------------ Bradley-Terry


@pytest.mark.parametrize("use_jit", [False, True])
def test_bradley_terry_matches_numpy(rw, use_jit):
    r_w, r_l, m = rw
    fn = functools.partial(bradley_terry, label_smoothing=0.1, center_rewards_coefficient=0.01)
    fn = jax.jit(fn) if use_jit else fn
    got = fn(r_w, r_l, m)
    want = np_smoothed(r_w - r_l - m, 0.1) + 0.01 * (r_w + r_l) ** 2
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bradley_terry_plain_is_neg_log_sigmoid(rw):
    r_w, r_l, _ = rw
    want = -np.log(1.0 / (1.0 + np.exp(-(r_w - r_l))))
    np.testing.assert_allclose(bradley_terry(r_w, r_l), want, rtol=1e-5)
    np.testing.assert_allclose(bradley_terry(r_w, r_l, np.zeros(6)), want, rtol=1e-5)
    assert registry.canonical("bt") == "bradley_terry"


def test_bradley_terry_grads_and_extremes(rw):
    r_w, r_l, m = rw
    with jax.enable_x64(True):
        f = lambda a, b: bradley_terry(a, b, m, label_smoothing=0.1, center_rewards_coefficient=0.01)
        check_grads(f, (r_w, r_l), order=1, modes=["rev"])
    big = bradley_terry(jnp.full((2,), -1e4, jnp.bfloat16), jnp.array([1e4, -1e4], jnp.bfloat16))
    assert big.dtype == jnp.float32 and np.all(np.isfinite(big))
    v = float(jnp.bfloat16(1e4))  # 1e4 rounds to 9984 in bf16
    np.testing.assert_allclose(big, [2 * v, np.log(2)], rtol=1e-6)


# ------------------------------------------------------------------ Secrets of RLHF II


def np_secrets(r_w, r_l, mu, flip_below, smooth_below, eps, coef):
    out = []
    for a, b, m in zip(r_w, r_l, mu):
        flip = m < min(flip_below, 0.0)
        if flip:  # swap the pair
            a, b, m = b, a, -m
        e = eps if (not flip and m < smooth_below) else 0.0
        out.append(np_smoothed(a - b - coef * m, e))
    return np.array(out)


def test_preference_strength_and_thresholds():
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.5, 1.0, (4, 7))
    mean, std = preference_strength(diffs)
    np.testing.assert_allclose(mean, diffs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, diffs.std(0), rtol=1e-5)
    lo, hi = strength_thresholds(mean, flip_fraction=0.1, smooth_fraction=0.3)
    assert (lo, hi) == pytest.approx((np.quantile(np.asarray(mean), 0.1), np.quantile(np.asarray(mean), 0.4)))
    with pytest.raises(ValueError, match="flip_fraction"):
        strength_thresholds(mean, flip_fraction=0.8, smooth_fraction=0.5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_secrets_rm_matches_numpy(rw, use_jit):
    r_w, r_l, _ = rw
    mu = np.array([-2.0, -0.5, 0.1, 0.4, 1.5, -0.05])
    hp = dict(flip_below=-0.3, smooth_below=0.5, label_smoothing=0.2, margin_coef=0.5)
    fn = jax.jit(functools.partial(secrets_rm, **hp)) if use_jit else functools.partial(secrets_rm, **hp)
    got = fn(r_w, r_l, mu)
    np.testing.assert_allclose(got, np_secrets(r_w, r_l, mu, -0.3, 0.5, 0.2, 0.5), rtol=1e-5)
    # Flipped pairs (mu = -2, -0.5) are exactly BT on the swapped pair with margin |mu| * coef.
    np.testing.assert_allclose(got[0], np_nls(r_l[0] - r_w[0] - 0.5 * 2.0), rtol=1e-5)
    # A positive-strength pair is never flipped, even below a positive flip threshold.
    pos = secrets_rm(r_w[:1], r_l[:1], np.array([0.2]), flip_below=1.0, smooth_below=0.0, margin_coef=0.0)
    np.testing.assert_allclose(pos, np_nls(r_w[:1] - r_l[:1]), rtol=1e-5)


def test_secrets_rm_grads(rw):
    r_w, r_l, _ = rw
    mu = np.array([-2.0, -0.5, 0.1, 0.4, 1.5, -0.05])
    with jax.enable_x64(True):
        f = lambda a, b: secrets_rm(a, b, mu, flip_below=-0.3, smooth_below=0.5)
        check_grads(f, (r_w, r_l), order=1, modes=["rev"])


# ------------------------------------------------------------------ GPM


def np_gpm_score(vi, vj, scales=None):
    k = vi.shape[-1] // 2
    lam = np.ones(vi.shape[:-1] + (k,)) if scales is None else scales
    out = []
    for b in range(vi.shape[0]):
        r = np.kron(np.diag(lam[b]), np.array([[0.0, -1.0], [1.0, 0.0]]))  # block-diagonal R
        out.append((r @ vi[b]) @ vj[b])
    return np.array(out)


@pytest.fixture(scope="module")
def emb():
    rng = np.random.default_rng(2)
    return rng.normal(size=(5, 6)), rng.normal(size=(5, 6)), rng.uniform(0.5, 2.0, (5, 3))


def test_gpm_score_properties(emb):
    vi, vj, lam = emb
    for scales in (None, lam):
        s_ij = gpm_score(vi, vj, scales=scales)
        np.testing.assert_allclose(s_ij, np_gpm_score(vi, vj, scales), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gpm_score(vj, vi, scales=scales), -s_ij, rtol=1e-6)
        np.testing.assert_array_equal(gpm_score(vi, vi, scales=scales), 0.0)
    a, b = vi[:, :2], vj[:, :2]  # k = 1: the 2x2 cross product
    cross = np.linalg.det(np.stack([a, b], axis=1))  # det [[a0, a1], [b0, b1]] = a0 b1 - a1 b0
    np.testing.assert_allclose(gpm_score(a, b), cross, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        gpm_score(vi[:, :5], vj[:, :5])


@pytest.mark.parametrize("use_jit", [False, True])
def test_gpm_loss_matches_numpy(emb, use_jit):
    vi, vj, lam = emb
    fn = jax.jit(functools.partial(gpm, tau=0.1)) if use_jit else functools.partial(gpm, tau=0.1)
    np.testing.assert_allclose(fn(vi, vj, lam), np_nls(np_gpm_score(vi, vj, lam) / 0.1), rtol=1e-5)
    # Equal embeddings: P = 1/2.
    np.testing.assert_allclose(gpm(vi, vi), np.full(5, np.log(2)), rtol=1e-6)


def test_gpm_grads_and_extremes(emb):
    vi, vj, lam = emb
    with jax.enable_x64(True):
        check_grads(lambda a, b, s: gpm(a, b, s, tau=0.5), (vi, vj, lam), order=1, modes=["rev"])
    big = gpm(jnp.asarray(vi * 1e3, jnp.bfloat16), jnp.asarray(vj * 1e3, jnp.bfloat16))
    assert big.dtype == jnp.float32 and np.all(np.isfinite(big))


# ------------------------------------------------------------------ PAL


def np_pal(fw, fl, logits, protos, scale):
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    u = np.einsum("bk,kd->bd", w, protos) if protos.ndim == 2 else np.einsum("bk,bkd->bd", w, protos)
    cos = lambda f: np.sum(f * u, -1) / (np.linalg.norm(f, axis=-1) * np.linalg.norm(u, axis=-1))
    return np_nls(scale * cos(fw) - scale * cos(fl)), scale * cos(fw)


@pytest.mark.parametrize("shared", [True, False])
def test_pal_matches_numpy(shared):
    rng = np.random.default_rng(3)
    b, k, d = 4, 3, 5
    fw, fl, logits = rng.normal(size=(b, d)), rng.normal(size=(b, d)), rng.normal(size=(b, k))
    protos = rng.normal(size=(k, d)) if shared else rng.normal(size=(b, k, d))
    want, want_rw = np_pal(fw, fl, logits, protos, 5.0)
    got = jax.jit(functools.partial(pal, scale=5.0))(fw, fl, logits, protos)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    u = pal_ideal_point(logits, protos)
    np.testing.assert_allclose(pal_reward(fw, u, scale=5.0), want_rw, rtol=1e-5)
    with jax.enable_x64(True):
        check_grads(lambda a, c, g: pal(a, fl, c, g, scale=5.0), (fw, logits, protos), order=1, modes=["rev"])
    out = pal(jnp.asarray(fw * 1e4, jnp.bfloat16), jnp.asarray(fl, jnp.bfloat16), logits, protos)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
