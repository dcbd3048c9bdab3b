"""Token and sequence log-probabilities: gather minus logsumexp in fp32, chunked over vocabulary.

Array conventions (the "sequence batch" shared with ``alignjax.data`` and ``alignjax.train``), all
``[R, T]`` (rows x tokens):

* ``input_ids`` int32, ``positions`` int32, ``segment_ids`` int32 (0 = padding);
* ``branch_ids`` int32 (optional shared-prompt layout: 0 prompt, 1 chosen, 2 rejected);
* ``loss_mask`` float32: 1 where token ``t`` is a completion token whose
  ``log p(token_t | tokens before t in its segment/branch)`` counts (always 0 on the first token of a
  segment or branch, so the ordinary shifted alignment never crosses a boundary that counts);
* ``example_ids`` int32: which sequence each token belongs to (-1 = none). For pairs, sequences
  ``0..B-1`` are the chosen and ``B..2B-1`` the rejected completions (see :func:`split_pairs`).

Per-token log-probs are aligned at the *target* position: ``logps[r, t] = log p(input_ids[r, t] |
input_ids[r, :t])``, with 0 at ``t = 0``. A sequence's log-prob is then a masked segment sum over
``example_ids``, the same for padded rows, packed rows and the shared-prompt layout.

The chunked path (:func:`chunked_next_token_logps`) computes the same values from the final hidden
states and the unembedding matrix without materialising the ``[B, T, V]`` fp32 logits: an online
(streaming) logsumexp over vocabulary chunks, each chunk rematerialised in the backward pass, so the
memory of the log-prob computation is O(B T chunk) rather than O(B T V).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp

from alignjax.models.softmax import logsumexp, stable_shift
from alignjax.models.transformer import mixed_precision_logits
from alignjax.sharding import DEFAULT_RULES, logical_to_spec

__all__ = [
    "token_logps",
    "next_token_logps",
    "chunked_token_logps",
    "chunked_next_token_logps",
    "sequence_logps",
    "sequence_lengths",
    "masked_sum",
    "masked_mean",
    "split_pairs",
    "batch_sequence_logps",
    "model_vocab_shards",
    "counted_positions",
    "STRICT_ROUNDING",
    "strict_rounding",
]

# Compiler options for every program whose log-probs are compared with log-probs computed elsewhere
# (policy vs reference in the train step, the reference cache, evaluation, scoring): equal params
# must give bitwise-equal log-probs in all of them, as PyTorch's eager ops do. Two things break that:
#
# * Excess precision (all backends). By default XLA may keep an f32 intermediate where the program
#   rounds to bf16, deciding per fusion, so the same forward can round differently in two programs --
#   or twice in one: a bf16 DPO step whose policy equals its reference gave loss 0.6917 (CPU) / 0.669
#   (H200), not log 2. Its cost on bf16 steps is in docs/benchmarks.md.
# * Fusion-dependent elementwise code (CPU, fp32 too). The differentiated policy forward keeps
#   intermediates for the backward (exp of the log-softmax, the SiLU's sigmoid, ...), so XLA:CPU fuses
#   it differently from the reference's plain forward, and the same op then ran different code: an exp
#   fused into a YNNPACK reduction (one program) vs XLA's loop (the other), and the MLIR fusion
#   emitters' elementwise code differs by fusion. Result: 1-ulp differences in per-sequence log-probs,
#   e.g. rewards/chosen -1.2e-8 and accuracies 0.083 at step 1 with policy = reference. XLA's own
#   (legacy) elementwise emitter and no YNNPACK fusions give one result for an op wherever it is fused;
#   the CPU step was no slower with them (tests/train/test_step.py holds the equality).
#
# bf16 compute on CPU then routes each dot, and only the dots, to YNNPACK: XLA:CPU's own bf16 dot
# is an fp32 gemm on upcast operands, 3-5x slower than YNNPACK's bf16 kernels (AMX where the CPU has
# it; docs/benchmarks.md). A dot is one library call wherever it sits, so the equality holds (tested in
# bf16 too). fp32 programs keep XLA's dots: YNNPACK's fp32 dots made the fp32 step slower.
_STRICT_ALL: dict[str, Any] = {"xla_allow_excess_precision": False}
_STRICT_CPU: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_use_fusion_emitters": False,
}
_STRICT_CPU_BF16: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


class _StrictRounding(Mapping[str, Any]):
    """The options for the backend in use and a compute dtype, read when a program is jitted
    (``jax.default_backend()`` then; the CPU-only options are not handed to GPU/TPU compilers)."""

    def __init__(self, compute_dtype: Any) -> None:
        self._bf16 = jnp.dtype(compute_dtype) == jnp.bfloat16

    def _options(self) -> dict[str, Any]:
        if jax.default_backend() != "cpu":
            return dict(_STRICT_ALL)
        return {**_STRICT_ALL, **_STRICT_CPU, **(_STRICT_CPU_BF16 if self._bf16 else {})}

    def __getitem__(self, key: str) -> Any:
        return self._options()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._options())

    def __len__(self) -> int:
        return len(self._options())

    def __repr__(self) -> str:
        return f"STRICT_ROUNDING({self._options()})"


def strict_rounding(compute_dtype: Any) -> Mapping[str, Any]:
    """:data:`STRICT_ROUNDING` for a program that computes in ``compute_dtype`` (a model's
    ``config.dtype``): the same equality, with the dots that dtype runs fastest on the backend."""
    return _StrictRounding(compute_dtype)


STRICT_ROUNDING: Mapping[str, Any] = strict_rounding("float32")


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Log-probability of each target token: ``logits[..., y] - logsumexp(logits)``, in fp32.

    ``log softmax(z)_y = z_y - log sum_v exp(z_v)``; only the gathered entry and the logsumexp are
    formed, never the full ``[B, T, V]`` log-softmax.

    Args:
      logits: ``[B, T, V]`` (any float dtype; upcast to fp32 inside the reductions).
      targets: ``[B, T]`` integer token ids in ``[0, V)``.

    Returns:
      ``[B, T]`` fp32 log-probs, aligned with ``targets``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))  # [B=1, T=2, V=3]
      >>> print(np.asarray(token_logps(logits, jnp.array([[0, 1]])), float).round(4))
      [[-0.6931 -0.2231]]
    """
    chex.assert_rank(logits, 3)
    chex.assert_rank(targets, 2)
    chex.assert_equal_shape_prefix([logits, targets], 2)
    chex.assert_type(targets, int)
    logits = logits.astype(jnp.float32)
    lse = logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse


def _shift_right(logps_BxT: jax.Array) -> jax.Array:
    """Moves a prediction made at ``t`` (for token ``t + 1``) to position ``t + 1``; 0 at ``t = 0``."""
    return jnp.concatenate([jnp.zeros_like(logps_BxT[:, :1]), logps_BxT[:, :-1]], axis=1)


def next_token_logps(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Causal LM log-probs aligned at the target: ``out[:, t] = log p(input_ids[:, t] | input_ids[:, <t])``.

    ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, so
    ``out[:, t] = token_logps(logits[:, t - 1], input_ids[:, t])`` for ``t >= 1`` and ``out[:, 0] = 0``.

    Args:
      logits: ``[B, T, V]``.
      input_ids: ``[B, T]``.

    Returns:
      ``[B, T]`` fp32.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> probs = jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]])  # [1, 3, 3]
      >>> input_ids = jnp.array([[2, 0, 1]])
      >>> print(np.asarray(next_token_logps(jnp.log(probs), input_ids), float).round(4))
      [[ 0.     -0.6931 -0.2231]]

      Position 1 holds log p(token 0) from the prediction at position 0, position 2 log p(token 1)
      from position 1; the last prediction has no target.
    """
    chex.assert_rank(logits, 3)
    chex.assert_rank(input_ids, 2)
    chex.assert_equal_shape_prefix([logits, input_ids], 2)
    # The target of position t is input_ids[t + 1]; the wrapped last target is dropped by the shift.
    targets = jnp.roll(input_ids, -1, axis=1)
    return _shift_right(token_logps(logits, targets))


# --------------------------------------------------------------------------------------------------
# Chunked path: online logsumexp over vocabulary chunks (and optionally over rows).
# --------------------------------------------------------------------------------------------------


def _vocab_scan_logps(
    hidden_NxD: jax.Array,
    unembedding_DxV: jax.Array,
    targets_N: jax.Array,
    vocab_chunk: int,
    vocab_shards: int = 1,
) -> jax.Array:
    """``z_y - logsumexp(z)`` with ``z = h W`` streamed over vocabulary chunks of ``vocab_chunk`` columns.

    Online logsumexp (as in "Online normalizer calculation for softmax", arXiv:1805.02867): with a
    running max ``m`` and running sum ``s = sum exp(z - m)``, a chunk ``c`` updates
    ``m' = max(m, max c)``, ``s' = s exp(m - m') + sum exp(c - m')``; at the end ``lse = m + log s``.
    The target logit is picked from the chunk that holds it. When the (per-shard) vocabulary is not
    a multiple of the chunk, the last chunk's start is clamped to ``V_shard - chunk`` and the columns
    already seen are masked out, so no padded copy of the unembedding is made.

    ``vocab_shards = S`` splits the vocabulary into ``S`` contiguous blocks (``W`` viewed as
    ``[D, S, V/S]``) that are streamed side by side, with one running ``(m, s)`` per block, merged at
    the end by ``lse = M + log sum_S s_S exp(m_S - M)``. With ``S`` = the size of the mesh axis that
    splits the vocabulary (``tensor``), each device streams only its own shard of ``W``: the chunk
    slice never crosses a shard boundary, so XLA does not all-gather the unembedding.
    """
    if vocab_shards == 1:
        return _vocab_scan_logps_unsharded(hidden_NxD, unembedding_DxV, targets_N, vocab_chunk)
    num_rows, dim = hidden_NxD.shape
    vocab = unembedding_DxV.shape[1]
    shard_vocab = vocab // vocab_shards
    vocab_chunk = min(vocab_chunk, shard_vocab)
    num_chunks = -(-shard_vocab // vocab_chunk)
    unembedding_DxSxC = unembedding_DxV.reshape(dim, vocab_shards, shard_vocab)
    shard_offsets = (jnp.arange(vocab_shards) * shard_vocab)[:, None]  # [S, 1]

    @jax.checkpoint  # the backward pass recomputes each chunk's logits instead of storing them
    def body(carry, index):
        m, s, picked = carry  # [N, S] each
        nominal_start = index * vocab_chunk
        start = jnp.minimum(nominal_start, shard_vocab - vocab_chunk)
        w_chunk = jax.lax.dynamic_slice_in_dim(unembedding_DxSxC, start, vocab_chunk, axis=2)
        z = mixed_precision_logits(hidden_NxD, w_chunk)  # [N, S, chunk] fp32
        local = start + jnp.arange(vocab_chunk)  # [chunk] column within the shard
        fresh = local >= nominal_start  # drops the overlap of a clamped last chunk
        z = jnp.where(fresh, z, -jnp.inf)
        # d lse / d m = 0 exactly, so the running max carries no gradient (cheaper, and no ties in max).
        m_new = jax.lax.stop_gradient(jnp.maximum(m, stable_shift(z)[..., 0]))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[..., None]), axis=-1)
        hit = fresh & ((shard_offsets + local) == targets_N[:, None, None])  # [N, S, chunk]
        picked = picked + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
        return (m_new, s, picked), None

    init = (
        jnp.full((num_rows, vocab_shards), -jnp.inf, jnp.float32),
        jnp.zeros((num_rows, vocab_shards), jnp.float32),
        jnp.zeros((num_rows, vocab_shards), jnp.float32),
    )
    # The first chunk has only finite logits, so m is finite after it and exp(m - m_new) never sees
    # inf - inf; m starts at -inf and exp(-inf) = 0 scales the empty initial sum.
    (m, s, picked), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
    top = jax.lax.stop_gradient(jnp.max(m, axis=-1))
    lse = top + jnp.log(jnp.sum(s * jnp.exp(m - top[:, None]), axis=-1))
    return jnp.sum(picked, axis=-1) - lse


def _vocab_scan_logps_unsharded(
    hidden_NxD: jax.Array, unembedding_DxV: jax.Array, targets_N: jax.Array, vocab_chunk: int
) -> jax.Array:
    """:func:`_vocab_scan_logps` with one vocabulary block: plain ``[N, chunk]`` logits (fewer buffers)."""
    num_rows = hidden_NxD.shape[0]
    vocab = unembedding_DxV.shape[1]
    num_chunks = -(-vocab // vocab_chunk)

    @jax.checkpoint  # the backward pass recomputes each chunk's logits instead of storing them
    def body(carry, index):
        m, s, picked = carry
        nominal_start = index * vocab_chunk
        start = jnp.minimum(nominal_start, vocab - vocab_chunk)
        w_chunk = jax.lax.dynamic_slice_in_dim(unembedding_DxV, start, vocab_chunk, axis=1)
        z = mixed_precision_logits(hidden_NxD, w_chunk)  # [N, chunk] fp32
        columns = start + jnp.arange(vocab_chunk)
        fresh = columns >= nominal_start  # drops the overlap of a clamped last chunk
        z = jnp.where(fresh[None, :], z, -jnp.inf)
        m_new = jax.lax.stop_gradient(jnp.maximum(m, stable_shift(z)[..., 0]))  # d lse / d m = 0
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=-1)
        hit = fresh[None, :] & (columns[None, :] == targets_N[:, None])
        picked = picked + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
        return (m_new, s, picked), None

    init = (
        jnp.full((num_rows,), -jnp.inf, jnp.float32),
        jnp.zeros((num_rows,), jnp.float32),
        jnp.zeros((num_rows,), jnp.float32),
    )
    (m, s, picked), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
    return picked - (m + jnp.log(s))


def chunked_token_logps(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    *,
    vocab_chunk: int | None = None,
    seq_chunk: int | None = None,
    vocab_shards: int = 1,
) -> jax.Array:
    """:func:`token_logps` of ``logits = hidden @ unembedding`` without forming the fp32 logits.

    Args:
      hidden: ``[B, T, D]`` final hidden states (after the final norm).
      unembedding: ``[D, V]`` output projection (the transposed embedding for tied models).
      targets: ``[B, T]`` token ids.
      vocab_chunk: columns per vocabulary chunk (online logsumexp); ``None`` = whole vocabulary.
      seq_chunk: rows (of the flattened ``B * T`` positions) per sequence chunk; ``None`` = all.
      vocab_shards: stream the vocabulary as this many contiguous blocks side by side; set it to the
        number of devices the unembedding's vocabulary dimension is split over (the ``tensor`` mesh
        axis), so that no device gathers the whole unembedding. Must divide ``V``; 1 by default.

    Returns:
      ``[B, T]`` fp32; the peak memory of the computation (forward and backward) holds one
      ``[seq_chunk, vocab_chunk]`` block of logits at a time.

    Examples:
      >>> import jax.numpy as jnp
      >>> hidden = jnp.sin(jnp.arange(80.0)).reshape(2, 5, 8)  # [B, T, D]
      >>> unembedding = jnp.cos(jnp.arange(88.0)).reshape(8, 11)  # [D, V]
      >>> targets = jnp.arange(10).reshape(2, 5)
      >>> dense = token_logps(hidden @ unembedding, targets)
      >>> chunked = chunked_token_logps(hidden, unembedding, targets, vocab_chunk=4, seq_chunk=3)
      >>> chunked.shape, bool(jnp.allclose(chunked, dense, atol=1e-5))
      ((2, 5), True)
    """
    chex.assert_rank([hidden, unembedding, targets], [3, 2, 2])
    chex.assert_equal_shape_prefix([hidden, targets], 2)
    chex.assert_axis_dimension(unembedding, 0, hidden.shape[-1])
    batch, length, dim = hidden.shape
    vocab = unembedding.shape[1]
    for name, value in (("vocab_chunk", vocab_chunk), ("seq_chunk", seq_chunk)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be a positive integer or None, got {value}")
    vocab_shards = int(vocab_shards)
    if vocab_shards <= 0 or vocab % vocab_shards:
        raise ValueError(f"vocab_shards={vocab_shards} must be a positive divisor of the vocabulary {vocab}")
    vocab_chunk = vocab if vocab_chunk is None else min(int(vocab_chunk), vocab)
    num_rows = batch * length
    hidden_NxD = hidden.reshape(num_rows, dim)
    targets_N = targets.reshape(num_rows).astype(jnp.int32)

    if seq_chunk is None or seq_chunk >= num_rows:
        out = _vocab_scan_logps(hidden_NxD, unembedding, targets_N, vocab_chunk, vocab_shards)
        return out.reshape(batch, length)

    seq_chunk = int(seq_chunk)
    num_blocks = -(-num_rows // seq_chunk)
    pad = num_blocks * seq_chunk - num_rows
    # Padded rows (zeros) give finite, discarded values.
    hidden_blocks = jnp.pad(hidden_NxD, ((0, pad), (0, 0))).reshape(num_blocks, seq_chunk, dim)
    target_blocks = jnp.pad(targets_N, (0, pad)).reshape(num_blocks, seq_chunk)

    @jax.checkpoint
    def block(args):
        h, y = args
        return _vocab_scan_logps(h, unembedding, y, vocab_chunk, vocab_shards)

    out = jax.lax.map(block, (hidden_blocks, target_blocks)).reshape(-1)[:num_rows]
    return out.reshape(batch, length)


def chunked_next_token_logps(
    hidden: jax.Array,
    unembedding: jax.Array,
    input_ids: jax.Array,
    *,
    vocab_chunk: int | None = None,
    seq_chunk: int | None = None,
    vocab_shards: int = 1,
) -> jax.Array:
    """:func:`next_token_logps` of ``logits = hidden @ unembedding``, computed chunk by chunk.

    ``out[:, t] = log p(input_ids[:, t] | input_ids[:, <t])`` with ``out[:, 0] = 0``; see
    :func:`chunked_token_logps` for the arguments. Equals
    ``next_token_logps(hidden @ unembedding, input_ids)`` (values and gradients).

    Args:
      hidden, unembedding, vocab_chunk, seq_chunk, vocab_shards: as :func:`chunked_token_logps`.
      input_ids: ``[B, T]`` token ids.

    Returns:
      ``[B, T]`` fp32, aligned at the target.

    Examples:
      >>> import jax.numpy as jnp
      >>> hidden = jnp.sin(jnp.arange(80.0)).reshape(2, 5, 8)  # [B, T, D]
      >>> unembedding = jnp.cos(jnp.arange(88.0)).reshape(8, 11)  # [D, V]
      >>> input_ids = jnp.arange(10).reshape(2, 5)
      >>> dense = next_token_logps(hidden @ unembedding, input_ids)
      >>> chunked = chunked_next_token_logps(hidden, unembedding, input_ids, vocab_chunk=4)
      >>> bool(jnp.allclose(chunked, dense, atol=1e-5)), chunked[:, 0].tolist()
      (True, [0.0, 0.0])
    """
    chex.assert_rank(input_ids, 2)
    targets = jnp.roll(input_ids, -1, axis=1)
    logps = chunked_token_logps(
        hidden, unembedding, targets, vocab_chunk=vocab_chunk, seq_chunk=seq_chunk, vocab_shards=vocab_shards
    )
    return _shift_right(logps)


# --------------------------------------------------------------------------------------------------
# Reductions.
# --------------------------------------------------------------------------------------------------


def _segment_sum(values_RxT: jax.Array, example_ids_RxT: jax.Array, num_sequences: int) -> jax.Array:
    # Tokens with example_id -1 (or out of range) go to an extra bucket that is dropped.
    ids = example_ids_RxT.reshape(-1).astype(jnp.int32)
    ids = jnp.where((ids >= 0) & (ids < num_sequences), ids, num_sequences)
    sums = jax.ops.segment_sum(values_RxT.reshape(-1), ids, num_segments=num_sequences + 1)
    return sums[:num_sequences]


def sequence_logps(
    token_logps: jax.Array, loss_mask: jax.Array, example_ids: jax.Array, num_sequences: int
) -> jax.Array:
    """Summed log-prob of each sequence: ``S_n = sum_{r,t} [example_ids[r,t] = n] mask[r,t] logp[r,t]``.

    Works unchanged for padded rows (``example_ids`` = row index), packed rows (several sequences per
    row) and the shared-prompt layout (chosen and rejected branches of one row carry ids ``i`` and
    ``B + i``). Tokens with ``example_ids = -1`` are ignored.

    Args:
      token_logps: ``[R, T]`` per-token log-probs aligned at the target (:func:`next_token_logps`).
      loss_mask: ``[R, T]`` float weights (0/1).
      example_ids: ``[R, T]`` int sequence index per token, -1 = none.
      num_sequences: ``N``, a static Python int.

    Returns:
      ``[N]`` fp32.

    Examples:
      Two padded rows (one sequence each), then the same two sequences packed into one row:

      >>> import jax.numpy as jnp
      >>> logps = jnp.array([[0.0, -1.0, -2.0], [0.0, -0.5, -0.5]])
      >>> mask = jnp.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
      >>> example_ids = jnp.array([[0, 0, 0], [1, 1, -1]])
      >>> sequence_logps(logps, mask, example_ids, 2).tolist()
      [-3.0, -0.5]
      >>> packed = jnp.array([[0.0, -1.0, -2.0, 0.0, -0.5]])
      >>> packed_mask = jnp.array([[0.0, 1.0, 1.0, 0.0, 1.0]])
      >>> packed_ids = jnp.array([[0, 0, 0, 1, 1]])
      >>> sequence_logps(packed, packed_mask, packed_ids, 2).tolist()
      [-3.0, -0.5]
    """
    chex.assert_rank([token_logps, loss_mask, example_ids], 2)
    chex.assert_equal_shape([token_logps, loss_mask, example_ids])
    values = token_logps.astype(jnp.float32) * loss_mask.astype(jnp.float32)
    return _segment_sum(values, example_ids, int(num_sequences))


def sequence_lengths(loss_mask: jax.Array, example_ids: jax.Array, num_sequences: int) -> jax.Array:
    """Counted tokens per sequence: ``n_k = sum_{r,t} [example_ids[r,t] = k] mask[r,t]``; ``[N]`` fp32.

    Args:
      loss_mask: ``[R, T]`` float weights (0/1).
      example_ids: ``[R, T]`` int sequence index per token, -1 = none.
      num_sequences: ``N``, a static Python int.

    Returns:
      ``[N]`` fp32 token counts.

    Examples:
      >>> import jax.numpy as jnp
      >>> mask = jnp.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
      >>> sequence_lengths(mask, jnp.array([[0, 0, 0], [1, 1, -1]]), 2).tolist()
      [2.0, 1.0]
    """
    chex.assert_rank([loss_mask, example_ids], 2)
    chex.assert_equal_shape([loss_mask, example_ids])
    return _segment_sum(loss_mask.astype(jnp.float32), example_ids, int(num_sequences))


def masked_sum(values: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """``sum(values * mask)`` over ``axis`` in fp32 (``mask`` 0/1 or weights, same shape).

    Args:
      values: any shape.
      mask: the shape of ``values``.
      axis: the axes to sum over (None = all).

    Returns:
      fp32 sums.

    Examples:
      >>> import jax.numpy as jnp
      >>> values, mask = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[1.0, 1.0, 0.0]])
      >>> float(masked_sum(values, mask)), masked_sum(values, mask, axis=-1).tolist()
      (3.0, [3.0])
    """
    chex.assert_equal_shape([values, mask])
    return jnp.sum(values.astype(jnp.float32) * mask.astype(jnp.float32), axis=axis)


def masked_mean(values: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """``sum(values * mask) / sum(mask)`` over ``axis`` in fp32; 0 where the mask is all zero.

    Args:
      values: any shape.
      mask: the shape of ``values``.
      axis: the axes to average over (None = all).

    Returns:
      fp32 means.

    Examples:
      >>> import jax.numpy as jnp
      >>> values = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
      >>> mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
      >>> masked_mean(values, mask, axis=-1).tolist()
      [1.5, 0.0]
    """
    total = masked_sum(values, mask, axis)
    count = jnp.sum(mask.astype(jnp.float32), axis=axis)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def split_pairs(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[2B, ...] -> (chosen [B, ...], rejected [B, ...])``.

    Sequences ``0..B-1`` are the chosen and ``B..2B-1`` the rejected completions.

    Args:
      values: ``[2B]``, ``[2B, T]`` or ``[2B, T, ...]`` per-sequence values (rank 1 to 3).

    Returns:
      ``(chosen, rejected)``, each with leading dimension ``B``.

    Examples:
      >>> import jax.numpy as jnp
      >>> chosen, rejected = split_pairs(jnp.array([-1.0, -2.0, -3.0, -4.0]))  # B = 2 pairs
      >>> chosen.tolist(), rejected.tolist()
      ([-1.0, -2.0], [-3.0, -4.0])
    """
    chex.assert_rank(values, {1, 2, 3})
    if values.shape[0] % 2:
        raise ValueError(
            f"split_pairs needs an even leading dimension (chosen then rejected), got {values.shape}"
        )
    half = values.shape[0] // 2
    return values[:half], values[half:]


# --------------------------------------------------------------------------------------------------
# Model -> per-sequence log-probs (the one place besides the train step that calls a model).
# --------------------------------------------------------------------------------------------------


def model_vocab_shards(model: Any, vocab: int) -> int:
    """Devices ``model.mesh`` splits the vocabulary over (by ``model.rules``); 1 if none or indivisible.

    Args:
      model: a :class:`~alignjax.models.Model` (or anything with ``mesh`` and ``rules``).
      vocab: the vocabulary size.

    Returns:
      The number of vocabulary shards, for ``chunked_token_logps(..., vocab_shards=...)``.

    Examples:
      >>> from alignjax.models import Model, ModelConfig
      >>> model_vocab_shards(Model(ModelConfig()), 256)  # no mesh: one shard
      1
    """
    mesh = getattr(model, "mesh", None)
    if mesh is None:
        return 1

    axes = logical_to_spec(("vocab",), getattr(model, "rules", None) or DEFAULT_RULES)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in axes)
    return size if vocab % size == 0 else 1


def batch_sequence_logps(
    model: Any,
    params: Any,
    batch: Mapping[str, jax.Array],
    num_sequences: int,
    *,
    vocab_chunk: int | None = None,
    seq_chunk: int | None = None,
    vocab_shards: int | None = None,
    logit_width: int | None = None,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-sequence summed log-probs and per-token log-probs of a sequence batch under ``model``
    (``dropout_rng``: the training forward of a model with LoRA dropout; None = dropout off).

    With ``vocab_chunk`` or ``seq_chunk`` set, uses ``model.hidden`` and ``model.unembedding`` and the
    chunked path; otherwise ``model.apply`` logits and :func:`next_token_logps`. With ``logit_width``
    below the row length, the unembedding runs only at the predictions of counted tokens
    (:func:`counted_positions`), as TRL's ``use_logits_to_keep``: same values, without the head's
    FLOPs on prompt and padding positions.

    Args:
      model: a :class:`~alignjax.models.Model` (``apply``, ``hidden``, ``unembedding``).
      params: its params.
      batch: a sequence batch: ``input_ids``, ``loss_mask``, ``example_ids`` and optionally
        ``positions``, ``segment_ids``, ``branch_ids`` (all ``[R, T]``).
      num_sequences: ``N``, a static Python int.
      vocab_chunk, seq_chunk: the chunked path's chunk sizes (:func:`chunked_token_logps`).
      vocab_shards: the chunked path's vocabulary blocks; None = the number of devices the model's
        mesh splits the vocabulary over.
      logit_width: at most this many counted tokens (``loss_mask > 0``) in any row, a static int (the
        ``data.max_completion_length`` bound of a padded row, :func:`alignjax.data.batching.counted_width`);
        a row with more makes every output NaN rather than drop any. None = every position.
      dropout_rng: a key for LoRA dropout (the training forward); None = no dropout.

    Returns:
      ``(sequence_logps [N], token_logps [R, T])``; the token log-probs are already multiplied by
      ``loss_mask``.

    Examples:
      A tiny random model scores two padded sequences; the chunked path gives the same log-probs.

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from alignjax.models import Model, ModelConfig
      >>> model = Model(ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
      ...                           num_kv_heads=1, head_dim=8, intermediate_size=32))
      >>> params = model.init(jax.random.PRNGKey(0))
      >>> batch = {
      ...     "input_ids": jnp.array([[1, 5, 6, 2], [1, 7, 2, 0]]),
      ...     "segment_ids": jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]]),
      ...     "loss_mask": jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]]),
      ...     "example_ids": jnp.array([[0, 0, 0, 0], [1, 1, 1, -1]]),
      ... }
      >>> score = jax.jit(lambda p, b: batch_sequence_logps(model, p, b, 2))
      >>> seq, tokens = score(params, batch)
      >>> seq.shape, tokens.shape
      ((2,), (2, 4))
      >>> score_chunked = jax.jit(lambda p, b: batch_sequence_logps(model, p, b, 2, vocab_chunk=5))
      >>> bool(jnp.allclose(seq, score_chunked(params, batch)[0], atol=1e-5))
      True
    """
    inputs = dict(
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
    )
    if batch.get("branch_ids") is not None:
        inputs["branch_ids"] = batch["branch_ids"]
    if dropout_rng is not None:
        inputs["dropout_rng"] = dropout_rng
    input_ids = batch["input_ids"]
    mask = batch["loss_mask"].astype(jnp.float32)
    gathered = logit_width is not None and logit_width < input_ids.shape[1]
    if vocab_chunk is None and seq_chunk is None and not gathered:
        logps = next_token_logps(model.apply(params, input_ids, **inputs), input_ids)
        return sequence_logps(logps, mask, batch["example_ids"], num_sequences), logps * mask
    hidden = model.hidden(params, input_ids, **inputs)
    chunks = None
    if vocab_chunk is not None or seq_chunk is not None:
        unembedding = model.unembedding(params)
        if vocab_shards is None:
            vocab_shards = model_vocab_shards(model, unembedding.shape[1])
        chunks = dict(vocab_chunk=vocab_chunk, seq_chunk=seq_chunk, vocab_shards=vocab_shards)
    if not gathered:
        logps = chunked_next_token_logps(hidden, unembedding, input_ids, **chunks)
        return sequence_logps(logps, mask, batch["example_ids"], num_sequences), logps * mask
    if chunks is None:
        head = lambda picked, targets: token_logps(model.logits_from_hidden(params, picked), targets)
    else:
        head = lambda picked, targets: chunked_token_logps(picked, unembedding, targets, **chunks)
    return _counted_logps(head, hidden, input_ids, mask, batch["example_ids"], num_sequences, logit_width)


def _counted_logps(
    head: Callable[[jax.Array, jax.Array], jax.Array],
    hidden: jax.Array,
    input_ids: jax.Array,
    mask: jax.Array,
    example_ids: jax.Array,
    num_sequences: int,
    width: int,
) -> tuple[jax.Array, jax.Array]:
    """:func:`batch_sequence_logps` with ``head(hidden [R, W, D], targets [R, W]) -> logps [R, W]``
    run only at the ``width`` predictions of each row's counted tokens; every output NaN when a row
    has more counted tokens than ``width``."""
    positions = counted_positions(mask, width)
    picked = jnp.take_along_axis(hidden, jnp.maximum(positions - 1, 0)[..., None], axis=1)
    logps = head(picked, jnp.take_along_axis(input_ids, positions, axis=1))
    # Position 0 predicts nothing (its log-prob is 0 in the dense path too).
    values = logps * jnp.take_along_axis(mask, positions, axis=1) * (positions > 0)
    ids = jnp.take_along_axis(example_ids, positions, axis=1)
    seq, tok = _segment_sum(values, ids, int(num_sequences)), _spread(values, positions, mask.shape[1])
    overflow = jnp.any(jnp.sum(mask > 0, axis=1) > width)
    return jnp.where(overflow, jnp.nan, seq), jnp.where(overflow, jnp.nan, tok)


def counted_positions(loss_mask: jax.Array, width: int) -> jax.Array:
    """``[R, width]`` int32: the target positions of each row's counted tokens (``loss_mask > 0``)
    in order, then uncounted ones to fill the row (rows with more than ``width`` counted tokens lose
    the rest: :func:`batch_sequence_logps` checks).

    Examples:
      >>> import jax.numpy as jnp
      >>> counted_positions(jnp.array([[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]]), 2).tolist()
      [[2, 3], [1, 0]]
    """
    order = jnp.argsort(loss_mask <= 0, axis=1, stable=True)
    return order[:, :width].astype(jnp.int32)


def _spread(values_RxL: jax.Array, positions_RxL: jax.Array, length: int) -> jax.Array:
    """``[R, length]`` with ``values[r, l]`` at ``positions[r, l]`` and 0 elsewhere (positions distinct
    per row). A select-and-sum rather than a scatter: its gradient is a gather-free select too, where
    XLA:CPU runs a scatter as a loop over its elements."""
    hit = positions_RxL[:, :, None] == jnp.arange(length, dtype=positions_RxL.dtype)
    return jnp.sum(jnp.where(hit, values_RxL[:, :, None], 0.0), axis=1)
