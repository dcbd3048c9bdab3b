"""SparsePO against a NumPy loop implementation; masked equals sliced; grads; extremes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from alignjax.losses import registry
from alignjax.losses.token_level import sparsepo

B, T = 3, 5
LENS_W = [5, 3, 1]
LENS_L = [2, 4, 5]
KEYS = ["cw", "cl", "rw", "rl", "kw", "kl", "mw", "ml", "uw", "ul", "dw", "dl"]


def np_sparsepo(x, lens_w, lens_l, beta=0.1, lam=0.0, independent=False):
    """Per-example loop over the valid tokens only (never touches padding)."""
    out = []
    for b in range(len(lens_w)):
        nw, nl = lens_w[b], lens_l[b]
        uw, ul = x["uw"][b, :nw], x["ul"][b, :nl]
        dw, dl = (x["dw"][b, :nw], x["dl"][b, :nl]) if independent else (uw, ul)
        u = np.sum(uw * (x["cw"][b, :nw] - x["rw"][b, :nw]))
        u -= np.sum(ul * (x["cl"][b, :nl] - x["rl"][b, :nl]))
        d = np.sum(dw * x["kw"][b, :nw]) - np.sum(dl * x["kl"][b, :nl])
        l1 = np.sum(np.abs(uw)) + np.sum(np.abs(ul))
        if independent:
            l1 += np.sum(np.abs(dw)) + np.sum(np.abs(dl))
        out.append(np.logaddexp(0.0, -beta * (u - d)) + lam * l1)
    return np.array(out)


def make(seed=0, garbage=None):
    rng = np.random.default_rng(seed)
    x = {
        "cw": rng.normal(-2, 1, (B, T)),
        "cl": rng.normal(-2, 1, (B, T)),
        "rw": rng.normal(-2, 1, (B, T)),
        "rl": rng.normal(-2, 1, (B, T)),
        "kw": rng.normal(0, 0.5, (B, T)),
        "kl": rng.normal(0, 0.5, (B, T)),
        "uw": rng.uniform(0, 1, (B, T)),
        "ul": rng.uniform(0, 1, (B, T)),
        "dw": rng.uniform(0, 1, (B, T)),
        "dl": rng.uniform(0, 1, (B, T)),
    }
    x["mw"] = (np.arange(T)[None] < np.array(LENS_W)[:, None]).astype(np.float32)
    x["ml"] = (np.arange(T)[None] < np.array(LENS_L)[:, None]).astype(np.float32)
    if garbage is not None:
        for k in ["cw", "rw", "kw", "uw", "dw"]:
            x[k] = np.where(x["mw"] > 0, x[k], garbage)
        for k in ["cl", "rl", "kl", "ul", "dl"]:
            x[k] = np.where(x["ml"] > 0, x[k], garbage)
    return x


def call(x, independent, fn=sparsepo, **hp):
    args = [x[k] for k in KEYS[:10]]
    kl_masks = (x["dw"], x["dl"]) if independent else (None, None)
    return fn(*args, *kl_masks, **hp)


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("use_jit", [False, True])
def test_sparsepo_matches_numpy(independent, use_jit):
    x = make()
    hp = dict(beta=0.5, sparsity_weight=0.01)
    fn = jax.jit(functools.partial(sparsepo, **hp)) if use_jit else functools.partial(sparsepo, **hp)
    got = call({k: jnp.asarray(v, jnp.float32) for k, v in x.items()}, independent, fn=fn)
    want = np_sparsepo(x, LENS_W, LENS_L, 0.5, 0.01, independent)
    assert got.shape == (B,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("garbage", [1e9, np.nan])
def test_masked_equals_sliced(garbage):
    clean, dirty = make(1), make(1, garbage=garbage)
    batched = call(dirty, True, beta=0.3, sparsity_weight=0.1)
    assert np.all(np.isfinite(batched))
    for b in range(B):
        # Each example alone, cut to a common length that covers its valid tokens.
        n = max(LENS_W[b], LENS_L[b])
        sliced = {k: v[b : b + 1, :n] for k, v in clean.items()}
        alone = call(sliced, True, beta=0.3, sparsity_weight=0.1)
        np.testing.assert_allclose(batched[b], alone[0], rtol=1e-5)
    # Garbage in padding changes neither the values nor the (finite) gradients.
    g = jax.grad(lambda cw: jnp.sum(call({**dirty, "cw": cw}, True)))(jnp.asarray(dirty["cw"], jnp.float32))
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[dirty["mw"] == 0], 0.0)


def test_sparsepo_grads():
    x = make(2)
    with jax.enable_x64(True):
        def f(cw, rl, uw, dl):
            return call({**x, "cw": cw, "rl": rl, "uw": uw, "dl": dl}, True, beta=0.5, sparsity_weight=0.1)

        check_grads(f, (x["cw"], x["rl"], x["uw"] + 0.1, x["dl"] + 0.1), order=1, modes=["rev"])


def test_sparsepo_all_ones_masks_is_dpo_minus_kl():
    x = make(3)
    x["uw"], x["ul"] = np.ones((B, T)), np.ones((B, T))
    x["kw"], x["kl"] = np.zeros((B, T)), np.zeros((B, T))
    got = call(x, False, beta=0.1)
    sw = np.sum((x["cw"] - x["rw"]) * x["mw"], 1)
    sl = np.sum((x["cl"] - x["rl"]) * x["ml"], 1)
    np.testing.assert_allclose(got, np.logaddexp(0.0, -0.1 * (sw - sl)), rtol=1e-5)


def test_sparsepo_extreme_bf16_and_errors():
    x = make(4)
    x["cw"] = np.full((B, T), -1e4)
    got = call({k: jnp.asarray(v, jnp.bfloat16) for k, v in x.items()}, True)
    assert got.dtype == jnp.float32 and np.all(np.isfinite(got))
    with pytest.raises(ValueError, match="chosen_kl_mask and rejected_kl_mask"):
        sparsepo(*[x[k] for k in KEYS[:10]], x["dw"], None)
    with pytest.raises(AssertionError):
        sparsepo(*[x[k] for k in KEYS[:9]], x["ul"][:, :4])
    assert registry.spec("sparsepo").needs_reference
