"""The decoder's attention core and dense map against independent NumPy/jnp formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.models import transformer


def _numpy_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v per query head, kv head h // (H/K) (HF repeat_kv), in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for head in range(h):
        kv = head // group
        scores = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, kv]) / np.sqrt(d)
        scores = np.where(mask, scores, -np.inf)
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bts,bsd->btd", probs, v[:, :, kv])
    return out


def test_attention_core_matches_numpy_with_grouped_heads_and_packed_mask():
    rng = np.random.default_rng(0)
    b, t, h, kv, d = 2, 6, 4, 2, 8
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, t, kv, d)).astype(np.float32)
    v = rng.normal(size=(b, t, kv, d)).astype(np.float32)
    index = np.broadcast_to(np.arange(t), (b, t))
    segments = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]])  # row 0 packs two sequences
    branches = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 2, 2]])  # row 1: prompt | chosen | rejected
    mask = np.asarray(
        transformer.attention_mask(index, index, segments, segments, branches, branches, index, index, None)
    )
    got = transformer.attention_core(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, mask), atol=1e-5)
    # the rejected branch (row 1, tokens 4-5) never sees the chosen tokens (2-3)
    assert not mask[1, 4:, 2:4].any() and mask[1, 4:, :2].all()


@pytest.mark.parametrize("n_in", [1, 2])
def test_dense_values_and_gradients_equal_tensordot(n_in):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 5, 4, 6) if n_in == 2 else (3, 5, 24)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(4, 6, 7) if n_in == 2 else (24, 7)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.tanh(f(x, w)) * weights)

    ours = jax.jit(jax.value_and_grad(loss(lambda a, w: transformer.dense(a, w, n_in)), argnums=(0, 1)))
    ref = jax.value_and_grad(loss(lambda a, w: jnp.tensordot(a, w, axes=n_in)), argnums=(0, 1))
    (v1, (gx1, gw1)), (v2, (gx2, gw2)) = ours(x, kernel), ref(x, kernel)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(gx1, gx2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw1, gw2, rtol=1e-5, atol=1e-5)
