"""SparsePO against a port of the official trainer's loss (torch); masked equals sliced; grads; extremes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.test_util import check_grads

from alignjax.losses import registry
from alignjax.losses.token_level import sparsepo

B, T = 3, 5
LENS_W = [5, 3, 1]
LENS_L = [2, 4, 5]
KEYS = ["cw", "cl", "rw", "rl", "kw", "kl", "mw", "ml", "uw", "ul", "dw", "dl"]


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


def official_sparsepo(pol_w, pol_l, ref_w, ref_l, labels_w, labels_l, loss_w, loss_l, rw_w, rw_l, kl_w, kl_l,
                      *, beta, l1_u, l1_d, independent):
    """Port of the loss block of SparsePO's official trainer (huawei-noah/HEBO, SparsePO/src/trainers/
    sparse_trainer.py, commit 04f4ece, ``get_batch_loss_metrics``; mask_on_reward = mask_on_kl = True), in
    torch, from logits [B, T, V]: token log-ratios, token KL k_t = sum_v p_ref (log p - log p_ref), masked
    sums, -logsigmoid(beta (u - d)) and both L1 norms. ``__init__`` halves both L1 weights for a common
    mask."""
    if not independent:
        l1_u, l1_d = l1_u / 2.0, l1_d / 2.0
        kl_w, kl_l = rw_w, rw_l

    def side(pol, ref, labels, loss_mask, rw_mask, kl_mask):
        lp, lr = pol.log_softmax(-1), ref.log_softmax(-1)
        tok = torch.gather(lp, 2, labels[..., None])[..., 0] - torch.gather(lr, 2, labels[..., None])[..., 0]
        reward = (rw_mask * tok * loss_mask).sum(-1)
        token_kl = (ref.softmax(-1) * (lp - lr)).sum(-1)
        kl = (kl_mask * token_kl * loss_mask).sum(-1)
        n_u = torch.linalg.vector_norm(rw_mask * loss_mask, ord=1, dim=-1)
        n_d = torch.linalg.vector_norm(kl_mask * loss_mask, ord=1, dim=-1)
        return reward, kl, n_u, n_d

    rw, kw, nuw, ndw = side(pol_w, ref_w, labels_w, loss_w, rw_w, kl_w)
    rl, kl, nul, ndl = side(pol_l, ref_l, labels_l, loss_l, rw_l, kl_l)
    losses = -F.logsigmoid(beta * ((rw - rl) - (kw - kl)))
    return losses + l1_u * (nuw + nul) + l1_d * (ndw + ndl)


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("use_jit", [False, True])
def test_sparsepo_matches_official(independent, use_jit):
    r = np.random.default_rng(5)
    V = 11
    logits = {k: r.normal(0, 2, (B, T, V)).astype(np.float32) for k in ("pw", "pl", "qw", "ql")}
    labels = {k: r.integers(0, V, (B, T)) for k in ("w", "l")}
    x = make()
    masks = [x[k].astype(np.float32) for k in ("mw", "ml", "uw", "ul", "dw", "dl")]
    hp = dict(beta=0.5, l1_reward=0.03, l1_kl=0.01)
    want = official_sparsepo(*(torch.tensor(logits[k]) for k in ("pw", "pl", "qw", "ql")),
                             torch.tensor(labels["w"]), torch.tensor(labels["l"]), *map(torch.tensor, masks),
                             beta=0.5, l1_u=0.03, l1_d=0.01, independent=independent).numpy()

    def token_logps(z, y):
        return np.take_along_axis(jax.nn.log_softmax(z, -1), y[..., None], -1)[..., 0]

    def token_kl(pol, ref):  # the trainer's k_t, computed here from the same logits
        lp, lr = jax.nn.log_softmax(pol, -1), jax.nn.log_softmax(ref, -1)
        return jnp.sum(jnp.exp(lr) * (lp - lr), -1)

    ours = {"cw": token_logps(logits["pw"], labels["w"]), "cl": token_logps(logits["pl"], labels["l"]),
            "rw": token_logps(logits["qw"], labels["w"]), "rl": token_logps(logits["ql"], labels["l"]),
            "kw": token_kl(logits["pw"], logits["qw"]), "kl": token_kl(logits["pl"], logits["ql"]),
            **{k: x[k] for k in ("mw", "ml", "uw", "ul", "dw", "dl")}}
    fn = jax.jit(functools.partial(sparsepo, **hp)) if use_jit else functools.partial(sparsepo, **hp)
    got = call({k: jnp.asarray(v, jnp.float32) for k, v in ours.items()}, independent, fn=fn)
    assert got.shape == (B,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("garbage", [1e9, np.nan])
def test_masked_equals_sliced(garbage):
    clean, dirty = make(1), make(1, garbage=garbage)
    batched = call(dirty, True, beta=0.3, l1_reward=0.1, l1_kl=0.05)
    assert np.all(np.isfinite(batched))
    for b in range(B):
        # Each example alone, cut to a common length that covers its valid tokens.
        n = max(LENS_W[b], LENS_L[b])
        sliced = {k: v[b : b + 1, :n] for k, v in clean.items()}
        alone = call(sliced, True, beta=0.3, l1_reward=0.1, l1_kl=0.05)
        np.testing.assert_allclose(batched[b], alone[0], rtol=1e-5)
    # Garbage in padding changes neither the values nor the (finite) gradients.
    g = jax.grad(lambda cw: jnp.sum(call({**dirty, "cw": cw}, True)))(jnp.asarray(dirty["cw"], jnp.float32))
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[dirty["mw"] == 0], 0.0)


def test_sparsepo_grads():
    x = make(2)
    with jax.enable_x64(True):
        def f(cw, rl, uw, dl):
            x2 = {**x, "cw": cw, "rl": rl, "uw": uw, "dl": dl}
            return call(x2, True, beta=0.5, l1_reward=0.1, l1_kl=0.05)

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
