"""alignjax.logprobs against NumPy formulas: token log-probs, the chunked path, sequence reductions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import logprobs as lp


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_next_token_logps(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ls = np_log_softmax(logits)
    out = np.zeros(ids.shape)
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            out[b, t] = ls[b, t - 1, ids[b, t]]
    return out


# ------------------------------------------------------------------------------ token log-probs


def test_token_logps_matches_numpy_log_softmax_gather():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 5)).astype(np.int32)
    got = lp.token_logps(jnp.asarray(logits), jnp.asarray(targets))
    want = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
    assert got.dtype == jnp.float32 and got.shape == (2, 5)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-6)


def test_token_logps_is_stable_for_large_logits():
    logits = jnp.asarray([[[1e4, 0.0, -1e4]]], jnp.float32)
    got = lp.token_logps(logits, jnp.asarray([[0]]))
    np.testing.assert_allclose(got, [[0.0]], atol=1e-6)
    assert np.isfinite(lp.token_logps(logits, jnp.asarray([[2]]))).all()


def test_next_token_logps_alignment():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 6, 7)).astype(np.float32)
    ids = rng.integers(0, 7, size=(3, 6)).astype(np.int32)
    got = jax.jit(lp.next_token_logps)(logits, ids)
    np.testing.assert_allclose(got, np_next_token_logps(logits, ids), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[:, 0]), 0.0)


def test_bf16_logits_give_fp32_matching_fp32():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 8, 50)).astype(np.float32) * 2
    ids = rng.integers(0, 50, size=(2, 8)).astype(np.int32)
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    got = lp.next_token_logps(bf16, ids)
    assert got.dtype == jnp.float32
    # Exactly the fp32 computation on the bf16-rounded logits (the reductions run in fp32) ...
    np.testing.assert_allclose(got, np_next_token_logps(np.asarray(bf16.astype(jnp.float32)), ids), atol=1e-5)
    # ... and within bf16 rounding (|error| <= 2^-8 relative per logit, |logit| < 10) of full fp32.
    np.testing.assert_allclose(got, np_next_token_logps(logits, ids), atol=0.08)


def test_rank_and_shape_errors():
    with pytest.raises(AssertionError):
        lp.token_logps(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(AssertionError):
        lp.token_logps(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))


# ------------------------------------------------------------------------------ chunked path

B, T, D, V = 2, 7, 8, 37


@pytest.fixture(scope="module")
def dense_problem():
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    unembed = jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D) * 3, jnp.float32)
    ids = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
    return hidden, unembed, ids, weights


def _dense_loss(hidden, unembed, ids, weights):
    logits = jnp.einsum("btd,dv->btv", hidden, unembed)
    return jnp.sum(lp.next_token_logps(logits, ids) * weights)


@pytest.mark.parametrize(
    "vocab_chunk,seq_chunk",
    [(8, None), (37, None), (10, None), (1, None), (None, 3), (16, 5), (64, 4), (5, 14)],
    ids=["v8-ragged", "v-full", "v10-ragged", "v1", "s3-ragged", "v16-s5", "v-gt-V", "v5-s-all"],
)
def test_chunked_equals_unchunked_values_and_grads(dense_problem, vocab_chunk, seq_chunk):
    hidden, unembed, ids, weights = dense_problem
    logits = jnp.einsum("btd,dv->btv", hidden, unembed)
    want = lp.next_token_logps(logits, ids)
    chunks = dict(vocab_chunk=vocab_chunk, seq_chunk=seq_chunk)
    got = jax.jit(lambda h, w, i: lp.chunked_next_token_logps(h, w, i, **chunks))(hidden, unembed, ids)
    assert got.dtype == jnp.float32 and got.shape == (B, T)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got, np_next_token_logps(np.asarray(logits), np.asarray(ids)), atol=1e-5)

    def chunked_loss(h, w):
        return jnp.sum(lp.chunked_next_token_logps(h, w, ids, **chunks) * weights)

    gh, gw = jax.jit(jax.grad(chunked_loss, argnums=(0, 1)))(hidden, unembed)
    wh, ww = jax.grad(_dense_loss, argnums=(0, 1))(hidden, unembed, ids, weights)
    np.testing.assert_allclose(gh, wh, atol=1e-5)
    np.testing.assert_allclose(gw, ww, atol=1e-5)


@pytest.mark.parametrize(
    "vocab_shards,vocab_chunk,seq_chunk", [(2, 8, None), (4, 3, None), (5, 8, 6), (40, 1, None)]
)
def test_vocab_shards_equal_unchunked(vocab_shards, vocab_chunk, seq_chunk):
    # V = 40 in S contiguous blocks streamed side by side (chunks ragged within a block).
    rng = np.random.default_rng(6)
    hidden = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    unembed = jnp.asarray(rng.normal(size=(6, 40)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 40, size=(2, 5)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    kw = dict(vocab_chunk=vocab_chunk, seq_chunk=seq_chunk, vocab_shards=vocab_shards)
    got = jax.jit(lambda h, w, i: lp.chunked_next_token_logps(h, w, i, **kw))(hidden, unembed, ids)
    want = np_next_token_logps(np.asarray(hidden @ unembed), np.asarray(ids))
    np.testing.assert_allclose(got, want, atol=1e-5)
    loss = lambda h, w: jnp.sum(lp.chunked_next_token_logps(h, w, ids, **kw) * weights)
    grads = jax.jit(jax.grad(loss, (0, 1)))
    want_grads = jax.grad(_dense_loss, (0, 1))(hidden, unembed, ids, weights)
    for got_g, want_g in zip(grads(hidden, unembed), want_grads):
        np.testing.assert_allclose(got_g, want_g, atol=1e-5)
    with pytest.raises(ValueError, match="vocab_shards=3 must be a positive divisor of the vocabulary 40"):
        lp.chunked_next_token_logps(hidden, unembed, ids, vocab_shards=3)


def test_chunked_gradient_matches_softmax_formula(dense_problem):
    # d/dz_v log p(y) = [v = y] - softmax(z)_v, so dL/dh = sum_t w_t (W[:, y] - W softmax(z)).
    hidden, unembed, ids, weights = dense_problem
    h, w, y, c = (np.asarray(a, np.float64) for a in (hidden, unembed, ids, weights))
    y = y.astype(int)
    z = np.einsum("btd,dv->btv", h, w)
    p = np.exp(np_log_softmax(z))
    dz = -p
    for b in range(B):
        for t in range(T - 1):
            dz[b, t, y[b, t + 1]] += 1
    dz[:, :-1] *= c[:, 1:, None]
    dz[:, -1] = 0
    want_h = np.einsum("btv,dv->btd", dz, w)
    got_h = jax.grad(
        lambda hh: jnp.sum(lp.chunked_next_token_logps(hh, unembed, ids, vocab_chunk=6) * weights)
    )(hidden)
    np.testing.assert_allclose(got_h, want_h, atol=1e-5)


def test_chunked_bf16_inputs_match_fp32_on_rounded_inputs(dense_problem):
    hidden, unembed, ids, _ = dense_problem
    h16, w16 = hidden.astype(jnp.bfloat16), unembed.astype(jnp.bfloat16)
    got = lp.chunked_next_token_logps(h16, w16, ids, vocab_chunk=8)
    assert got.dtype == jnp.float32
    logits = jnp.einsum("btd,dv->btv", h16.astype(jnp.float32), w16.astype(jnp.float32))
    want = lp.next_token_logps(logits, ids)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_chunk_size_errors(dense_problem):
    hidden, unembed, ids, _ = dense_problem
    with pytest.raises(ValueError, match="vocab_chunk"):
        lp.chunked_next_token_logps(hidden, unembed, ids, vocab_chunk=0)
    with pytest.raises(ValueError, match="seq_chunk"):
        lp.chunked_next_token_logps(hidden, unembed, ids, seq_chunk=-1)


def _peak_bytes(fn, *args) -> int:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes + stats.output_size_in_bytes


def test_chunked_peak_memory_does_not_scale_with_vocab():
    # Forward + backward w.r.t. hidden: the unchunked path holds [N, V] fp32 logits (and their
    # cotangent); the chunked one only [N, chunk] blocks. XLA's compiled memory analysis is exact
    # about buffers, so the comparison is deterministic.
    n_rows, dim, vocab, chunk = 128, 16, 8192, 512
    hidden = jax.ShapeDtypeStruct((1, n_rows, dim), jnp.float32)
    unembed = jax.ShapeDtypeStruct((dim, vocab), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, n_rows), jnp.int32)

    def dense(h, w, i):
        return jax.grad(lambda hh: jnp.sum(lp.next_token_logps(jnp.einsum("btd,dv->btv", hh, w), i)))(h)

    def chunked(shards):
        def fn(h, w, i):
            logps = lambda hh: lp.chunked_next_token_logps(hh, w, i, vocab_chunk=chunk, vocab_shards=shards)
            return jax.grad(lambda hh: jnp.sum(logps(hh)))(h)

        return fn

    dense_bytes = _peak_bytes(dense, hidden, unembed, ids)
    assert dense_bytes >= n_rows * vocab * 4  # the full fp32 logits exist
    for shards in (1, 2):
        chunked_bytes = _peak_bytes(chunked(shards), hidden, unembed, ids)
        assert chunked_bytes * 4 <= dense_bytes, (shards, chunked_bytes, dense_bytes)
        # A few [N, S * chunk] blocks, whatever V is.
        assert chunked_bytes <= 4 * n_rows * shards * chunk * 4, (shards, chunked_bytes)


# ------------------------------------------------------------------------------ sequence reductions

# A bigram "model": the logits at t depend only on token t, so a sequence's log-prob is the same in
# any layout as long as the first token of every segment/branch is masked out.
VOCAB = 13


@pytest.fixture(scope="module")
def bigram():
    return np.random.default_rng(4).normal(size=(VOCAB, VOCAB)).astype(np.float32)


PROMPTS = [[1, 2, 3], [4, 5]]
CHOSEN = [[6, 7], [8, 9, 10]]
REJECTED = [[11], [12, 1, 2, 3]]


def _np_completion_logp(table, prompt, completion):
    ls = np_log_softmax(table)
    seq = prompt + completion
    return sum(ls[seq[t - 1], seq[t]] for t in range(len(prompt), len(seq)))


def _sequences():
    # Sequences 0..B-1 chosen, B..2B-1 rejected.
    return [(p, c) for p, c in zip(PROMPTS, CHOSEN)] + [(p, r) for p, r in zip(PROMPTS, REJECTED)]


def _padded_layout(length=9):
    seqs = _sequences()
    ids = np.zeros((len(seqs), length), np.int32)
    mask = np.zeros((len(seqs), length), np.float32)
    ex = np.full((len(seqs), length), -1, np.int32)
    for r, (p, c) in enumerate(seqs):
        ids[r, : len(p) + len(c)] = p + c
        mask[r, len(p) : len(p) + len(c)] = 1
        ex[r, : len(p) + len(c)] = r
    return ids, mask, ex


def _packed_layout(length=16):
    # Two rows: sequences (0, 3) in row 0 and (1, 2) in row 1, back to back.
    seqs = _sequences()
    rows = [[0, 3], [1, 2]]
    ids = np.zeros((2, length), np.int32)
    mask = np.zeros((2, length), np.float32)
    ex = np.full((2, length), -1, np.int32)
    for r, members in enumerate(rows):
        t = 0
        for n in members:
            p, c = seqs[n]
            ids[r, t : t + len(p) + len(c)] = p + c
            mask[r, t + len(p) : t + len(p) + len(c)] = 1
            ex[r, t : t + len(p) + len(c)] = n
            t += len(p) + len(c)
    return ids, mask, ex


def _shared_prompt_layout(length=12):
    # [prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected]: each branch restarts from the last
    # prompt token, so the shifted next-token alignment holds inside each branch.
    num_pairs = len(PROMPTS)
    ids = np.zeros((num_pairs, length), np.int32)
    mask = np.zeros((num_pairs, length), np.float32)
    ex = np.full((num_pairs, length), -1, np.int32)
    for i, (p, c, rj) in enumerate(zip(PROMPTS, CHOSEN, REJECTED)):
        row = p[:-1] + [p[-1]] + c + [p[-1]] + rj
        ids[i, : len(row)] = row
        t = len(p)  # first chosen token
        mask[i, t : t + len(c)] = 1
        ex[i, t - 1 : t + len(c)] = i
        t += len(c) + 1  # first rejected token
        mask[i, t : t + len(rj)] = 1
        ex[i, t - 1 : t + len(rj)] = num_pairs + i
    return ids, mask, ex


@pytest.mark.parametrize("layout", [_padded_layout, _packed_layout, _shared_prompt_layout])
def test_sequence_logps_equal_across_layouts(bigram, layout):
    ids, mask, ex = layout()
    logits = jnp.asarray(bigram)[jnp.asarray(ids)]
    logps = lp.next_token_logps(logits, jnp.asarray(ids))
    n = 2 * len(PROMPTS)
    got = jax.jit(lp.sequence_logps, static_argnums=3)(logps, jnp.asarray(mask), jnp.asarray(ex), n)
    want = [_np_completion_logp(bigram, p, c) for p, c in _sequences()]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    lengths = lp.sequence_lengths(jnp.asarray(mask), jnp.asarray(ex), n)
    np.testing.assert_array_equal(lengths, [len(c) for _, c in _sequences()])
    chosen, rejected = lp.split_pairs(got)
    np.testing.assert_allclose(chosen, want[:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rejected, want[2:], rtol=1e-5, atol=1e-5)


class _BigramModel:
    """Logits = the bigram table's row of the current token: the model interface
    ``batch_sequence_logps`` reads (``apply``, ``hidden``, ``logits_from_hidden``, ``unembedding``)."""

    mesh = None

    def __init__(self, table):
        self.table = jnp.asarray(table)

    def hidden(self, params, ids, **_):
        return jax.nn.one_hot(ids, self.table.shape[0]) * params

    def logits_from_hidden(self, params, hidden):
        return hidden @ self.table

    def apply(self, params, ids, **kw):
        return self.logits_from_hidden(params, self.hidden(params, ids, **kw))

    def unembedding(self, params):
        return self.table


@pytest.mark.parametrize("vocab_chunk", [None, 5])
@pytest.mark.parametrize("layout", [_padded_layout, _packed_layout, _shared_prompt_layout])
def test_head_at_counted_tokens_only_gives_every_log_prob(bigram, layout, vocab_chunk):
    """``logit_width`` (the head at the counted tokens only): the NumPy bigram log-probs per sequence
    and per token, the dense path's gradient, and NaN, not a dropped token, when a row holds more
    counted tokens than the width."""
    ids, mask, ex = layout()
    model, n = _BigramModel(bigram), 2 * len(PROMPTS)
    batch = dict(input_ids=jnp.asarray(ids), loss_mask=jnp.asarray(mask), example_ids=jnp.asarray(ex))
    width = int((mask > 0).sum(axis=1).max())
    assert width < ids.shape[1]

    def run(params, w):
        return lp.batch_sequence_logps(model, params, batch, n, vocab_chunk=vocab_chunk, logit_width=w)

    seq, tok = jax.jit(run, static_argnums=1)(1.0, width)
    np.testing.assert_allclose(seq, [_np_completion_logp(bigram, p, c) for p, c in _sequences()], rtol=1e-5)
    want_tok = np_next_token_logps(bigram[ids], ids) * mask
    np.testing.assert_allclose(tok, want_tok, rtol=1e-5, atol=1e-6)
    coeff = jnp.linspace(-1.0, 1.5, n)
    grad = jax.grad(lambda prm, w: jnp.sum(run(prm, w)[0] * coeff), argnums=0)
    np.testing.assert_allclose(grad(1.0, width), grad(1.0, None), rtol=1e-5)
    seq, tok = run(1.0, width - 1)
    assert np.isnan(np.asarray(seq)).all() and np.isnan(np.asarray(tok)).all()


def test_sequence_logps_ignores_negative_and_out_of_range_ids():
    logps = jnp.asarray([[1.0, 2.0, 4.0, 8.0]])
    mask = jnp.ones((1, 4))
    ex = jnp.asarray([[0, -1, 1, 5]])
    np.testing.assert_allclose(lp.sequence_logps(logps, mask, ex, 2), [1.0, 4.0])


def test_masked_sum_and_mean():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    m = (rng.random((3, 4)) > 0.5).astype(np.float32)
    m[1] = 0
    np.testing.assert_allclose(lp.masked_sum(x, m), (x * m).sum(), rtol=1e-6)
    np.testing.assert_allclose(lp.masked_sum(x, m, axis=1), (x * m).sum(1), rtol=1e-6)
    want = np.where(m.sum(1) > 0, (x * m).sum(1) / np.maximum(m.sum(1), 1), 0.0)
    got = lp.masked_mean(x, m, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[1] == 0.0
    np.testing.assert_allclose(lp.masked_mean(x, m), (x * m).sum() / m.sum(), rtol=1e-6)
    # Gradients stay finite through an all-zero mask.
    g = jax.grad(lambda v: lp.masked_mean(v, jnp.asarray(m), axis=1).sum())(jnp.asarray(x))
    assert np.isfinite(g).all()


def test_split_pairs():
    chosen, rejected = lp.split_pairs(jnp.arange(6.0))
    np.testing.assert_array_equal(chosen, [0, 1, 2])
    np.testing.assert_array_equal(rejected, [3, 4, 5])
    with pytest.raises(ValueError, match="even"):
        lp.split_pairs(jnp.arange(5.0))
