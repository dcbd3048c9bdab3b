"""The Flax decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, with logical axis names.

Parameter names mirror the Hugging Face module tree (``layers_0/self_attn/q_proj/kernel``) so the
checkpoint mapping in ``hf.py`` reads as a table. Kernels are stored ``[in..., out...]`` with heads
split out: q ``[D, H, Dh]``, k/v ``[D, K, Dh]``, o ``[H, Dh, D]``. With ``ModelConfig.scan_layers``
the layers are one ``nn.scan`` and every layer leaf is stacked on a leading ``layers`` axis
(``layers/self_attn/q_proj/kernel`` ``[L, D, H, Dh]``, the axis replicated by the default rules);
:func:`stack_layers` / :func:`unstack_layers` convert params (and KV caches) between the layouts.

Attention masking (full forward), for query index i and key index j of one row:
    allowed(i, j) = j <= i  and  seg[i] == seg[j] != 0  and  (branch[j] == 0 or branch[j] == branch[i])
                    and (no sliding window or pos[i] - pos[j] < window)
``segment_ids`` pack several sequences in one row (0 = padding); ``branch_ids`` lay out a shared
prompt (branch 0) followed by continuations (1, 2, ...) that each see the prompt but not each other.
The training forward applies this rule with XLA's masked softmax, cuDNN flash attention (GPUs) or the
Pallas splash kernel (TPUs; rows without branches or window), per ``ModelConfig.attention_kernel``.

Decoding with a cache: key/value buffers ``[B, S, K, Dh]`` hold the entry for position p in slot p;
a query at position p sees slots j <= p (and within the window), so slots beyond each row's current
position, stale or unwritten, are masked without any per-length recompilation. A scanned model's
cache is one stack ``[L, B, S, K, Dh]``, scanned together with the params.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignjax.models import lora as lora_lib
from alignjax.models.config import LoraConfig, ModelConfig
from alignjax.models.softmax import softmax
from alignjax.sharding import logical_to_spec

Array = jax.Array
Rules = tuple[tuple[str, Any], ...]


def fit_spec(
    shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules
) -> PartitionSpec:
    """PartitionSpec for ``logical_axes`` with mesh axes that do not divide a dimension dropped.

    Shapes are static, so this is a trace-time decision: e.g. a decode batch of 1 on a mesh whose
    batch axes have 4 devices stays replicated instead of failing.
    """

    spec = logical_to_spec(logical_axes, rules)
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept, size = [], 1
        for name in names:
            if dim % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def constrain(x: Array, logical_axes: Sequence[str | None], mesh: Mesh | None, rules: Rules) -> Array:
    """Sharding constraint on an activation by logical names (identity without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, fit_spec(x.shape, logical_axes, mesh, rules))
    )


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies 1 / theta^(2i/Dh), i < Dh/2, with Llama-3 scaling when configured.

    Llama-3 scaling ("The Llama 3 Herd of Models", arXiv:2407.21783): wavelengths longer than
    L/low_freq_factor are divided by ``factor``, shorter than L/high_freq_factor kept, and the band
    between interpolated with s = (L/wavelen - low)/(high - low): (1-s) f/factor + s f.
    """
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    sc = config.rope_scaling
    if sc is None:
        return inv.astype(np.float32)
    old = sc.original_max_position_embeddings
    low_wavelen, high_wavelen = old / sc.low_freq_factor, old / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: Array, inv_freq: np.ndarray, dtype: Any) -> tuple[Array, Array]:
    """HF's RoPE cos and sin, [B, T, 1, Dh] in ``dtype``: angles = position * inv_freq in fp32,
    each half of the head dim repeated; computed once per forward for every layer's q and k.

    On CPU the pair passes through an identity matmul, which is exact (one nonzero term per sum).
    Why: XLA:CPU expands optimization barriers before fusing, and fused the transcendental into every
    consumer, so a bench-7m DPO step evaluated cos and sin over each layer's [B, T, H, Dh] q and k, in
    the forward, the reference forward and the backward (about 4% of the fp32 step,
    docs/benchmarks.md); a dot's result is always materialised.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    half = angles.shape[-1]
    pair = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1).astype(dtype)
    if jax.default_backend() == "cpu":
        pair = _dot(pair, jnp.eye(2 * half, dtype=dtype)).astype(dtype)
    pair = pair[:, :, None, :]
    cos, sin = pair[..., :half], pair[..., half:]
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def apply_rope(x: Array, tables: tuple[Array, Array]) -> Array:
    """HF rotate-half RoPE: x cos + rotate_half(x) sin, with ``tables`` = :func:`rope_tables`.

    x: [B, T, N, Dh]. rotate_half(x) = concat(-x[Dh/2:], x[:Dh/2]).

    The arithmetic is fp32, rounded once to x's dtype, as PyTorch autocast runs HF's (its fp32 tables
    promote the bf16 q and k) and MaxText does. Rounding after every op is less exact, and XLA:CPU's
    strict bf16 rounding made each op a convert pair: the backward took twice as long
    (docs/benchmarks.md).
    """
    cos, sin = (table.astype(jnp.float32) for table in tables)
    wide = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-wide[..., half:], wide[..., :half]], axis=-1)
    return (wide * cos + rotated * sin).astype(x.dtype)


def attention_mask(
    q_index: Array,
    kv_index: Array,
    q_segment: Array,
    kv_segment: Array,
    q_branch: Array,
    kv_branch: Array,
    q_pos: Array,
    kv_pos: Array,
    sliding_window: int | None,
) -> Array:
    """Boolean [B, Tq, Tk] mask; see the module docstring for the rule. All inputs [B, T*] ints."""
    q = lambda a: a[:, :, None]
    k = lambda a: a[:, None, :]
    mask = (k(kv_index) <= q(q_index)) & (q(q_segment) == k(kv_segment)) & (q(q_segment) != 0)
    mask &= (k(kv_branch) == 0) | (k(kv_branch) == q(q_branch))
    if sliding_window is not None:
        mask &= q(q_pos) - k(kv_pos) < sliding_window
    return mask


def attention_implementation(q: Array, k: Array) -> str:
    """``"cudnn"`` (cuDNN flash attention) where it applies, else ``"xla"``; a trace-time decision.

    ``jax.nn.dot_product_attention(implementation=None)`` always takes the XLA path in jax 0.10-0.11
    (its auto-selection is a TODO), so we pick explicitly: cuDNN needs a CUDA backend, bf16/fp16
    q/k/v, head dim a multiple of 8 and <= 256 (<= 128 before Hopper; cuDNN itself rejects the rest),
    and even sequence lengths when a mask (lowered to an additive bias) is trained through.
    """
    Tq, Tk, Dh = q.shape[1], k.shape[1], q.shape[-1]
    ok = (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and k.dtype == q.dtype
        and Dh % 8 == 0
        and Dh <= 256
        and Tq % 2 == 0
        and Tk % 2 == 0
    )
    return "cudnn" if ok else "xla"


# Query block of the XLA path's causal block skipping (``attention_core(causal_block=...)``), used
# from 4 blocks up: at 512 tokens a row the bench-7m DPO step ran 1.29x faster with it, at 256 (two
# blocks) no faster while it compiled 20% slower (2-core Xeon, docs/benchmarks.md).
CAUSAL_BLOCK = 128
MIN_CAUSAL_BLOCKS = 4


def attention_core(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    *,
    implementation: str = "xla",
    causal_block: int | None = None,
) -> Array:
    """softmax(q k^T / sqrt(Dh), masked) v with grouped-query heads.

    q: [B, T, H, Dh]; k, v: [B, S, K, Dh] with H a multiple of K (query head h uses kv head h // (H/K),
    HF's repeat_kv); mask: bool [B, T, S] (``attention_mask``). Returns [B, T, H, Dh] in q's dtype.
    Scores and softmax are fp32 on the XLA path (as HF's eager attention): ``jax.nn.dot_product_attention``,
    or for fp32 and bf16 on CPU :func:`_cpu_attention` (the same values; folded heads, bf16 matmuls
    for bf16). ``"cudnn"``: flash attention, which never writes the T x S scores; the boolean mask
    becomes one additive bias [B, 1, T, S] shared by all heads, and ``is_causal`` (implied by every
    mask built here: j <= i) lets it skip the upper triangle. A fully masked (padding) query row gets
    an arbitrary finite output on either path; nothing reads it.

    ``causal_block`` (XLA path, T == S, a mask that allows key j for query i only where j <= i, as
    the full forward's row-causal mask does; from :data:`MIN_CAUSAL_BLOCKS` blocks up): the queries
    in blocks of this many, block ``[i, e)`` attending to keys ``[0, e)`` only. The keys skipped are
    masked for every query of the block, so the values are those of the full core up to fp32
    rounding (the products' accumulation order), and the upper triangle's scores, softmax and
    products are never computed (docs/benchmarks.md).
    """
    chex.assert_rank([q, k, v, mask], [4, 4, 4, 3])
    chex.assert_equal_shape([k, v])
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask[:, None], scale=q.shape[-1] ** -0.5, is_causal=True, implementation="cudnn"
            )
        except (NotImplementedError, ValueError, RuntimeError) as err:
            # cuDNN's shape/version checks run at trace time; fall back rather than fail the step.
            logging.getLogger(__name__).warning("cuDNN attention unavailable (%s); using XLA", err)
    T = q.shape[1]
    if causal_block is None or T != k.shape[1] or T < MIN_CAUSAL_BLOCKS * causal_block:
        return _xla_attention(q, k, v, mask)
    blocks = []
    for start in range(0, T, causal_block):
        end = min(start + causal_block, T)
        blocks.append(_xla_attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end]))
    return jnp.concatenate(blocks, axis=1)


# The name of every projection's output, which the dot remat policies keep (_REMAT_POLICY): the CPU
# dense layer's dot sits inside a custom-VJP call, where JAX's dot policies cannot see it.
DENSE_OUTPUT = "dense_output"
_CPU_CORE_DTYPES = (jnp.float32, jnp.bfloat16)  # the dtypes :func:`_cpu_attention` serves


def _xla_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """The XLA path's core: :func:`_cpu_attention` for fp32 or bf16 on the CPU backend, else
    ``jax.nn.dot_product_attention`` (a trace-time choice)."""
    if jax.default_backend() == "cpu" and q.dtype in _CPU_CORE_DTYPES and k.dtype == v.dtype == q.dtype:
        return _cpu_attention(q, k, v, mask)
    scale = 1.0 / math.sqrt(q.shape[-1])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="xla")


# Batched matmuls over leading [B, K] dims accumulating in fp32. For bf16 both operands are passed
# row-major (:func:`_gemm_operand`), the forms XLA:CPU hands to YNNPACK's bf16 kernels (why the form
# matters: the comment above _row_major).
def _bdot_nn(a: Array, b: Array) -> Array:
    """a [..., M, C] @ b [..., C, N]."""
    return jax.lax.dot_general(a, b, (((3,), (2,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32)


def _bdot_nt(a: Array, b: Array) -> Array:
    """a [..., M, C] @ b [..., N, C]^T, contracting both last dims."""
    return jax.lax.dot_general(a, b, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32)


def _bdot_tn(a: Array, b: Array) -> Array:
    """a [..., C, M]^T @ b [..., C, N], contracting both first (non-batch) dims: XLA:CPU's fp32 gemm
    reads the transposed operand in place."""
    return jax.lax.dot_general(a, b, (((2,), (2,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32)


def _gemm_operand(a: Array) -> Array:
    """a as the CPU gemm of its dtype takes it: materialised row-major for bf16 (YNNPACK), as it is
    for fp32 (XLA's gemm reads any layout in place; a materialised copy is a strided loop)."""
    return a if a.dtype == jnp.float32 else _row_major(a)


def _fold_heads(q: Array, kv_heads: int) -> Array:
    """[B, T, H, Dh] -> [B, K, G T, Dh]: the G query heads of a kv head as one block of rows."""
    B, T, H, Dh = q.shape
    return q.reshape(B, T, kv_heads, H // kv_heads, Dh).transpose(0, 2, 3, 1, 4).reshape(B, kv_heads, -1, Dh)


def _unfold_heads(x: Array, length: int) -> Array:
    """[B, K, G T, Dh] -> [B, T, K G, Dh] (inverse of :func:`_fold_heads`)."""
    B, K, GT, Dh = x.shape
    return x.reshape(B, K, GT // length, length, Dh).transpose(0, 3, 1, 2, 4).reshape(B, length, -1, Dh)


def _by_group(x: Array, length: int) -> Array:
    """[B, K, G T, N] -> [B, K, G, T, N]: folded rows viewed per query head (a bitcast), where the
    mask [B, 1, 1, T, S] broadcasts by plain indexing. A mask folded into the rows instead (broadcast
    then reshaped to [B, 1, G T, S]) was recomputed in every fusion that read it through div/mod
    index arithmetic: the softmax's exp ran 4x slower (docs/benchmarks.md)."""
    B, K, GT, N = x.shape
    return x.reshape(B, K, GT // length, length, N)


_MASKED_SCORE = -0.7 * float(np.finfo(np.float32).max)  # jax.nn.dot_product_attention's: finite


@jax.custom_vjp
def _cpu_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """fp32 or bf16 q, k, v on CPU: the values of ``jax.nn.dot_product_attention``'s XLA path (fp32
    scores and softmax, probabilities in q's dtype times v accumulated in fp32) with the query heads
    of each kv head folded into one matrix, so every product is one batched gemm over [B, K].

    Why: the XLA path vmaps over the head groups, and its scores, probabilities and their
    cotangents reach the backward's gemms in the vmapped layout: XLA:CPU transposed each [T, S]
    matrix in a strided loop (165 ms of a 1.3 s fp32 bench-7m DPO step), and for bf16 it ran the
    four backward matmuls and the probabilities x v as fp32 gemms (the cotangents stay fp32), about
    half the rate of its bf16 ones (docs/benchmarks.md). Here the softmax VJP takes its row sums
    from g . out (FlashAttention's D) instead of a reduction over the scores, fp32 contracts the
    [G T, S] matrices in place for dK and dV, and bf16 rounds the score cotangent to bf16 before its
    two matmuls (as PyTorch's autocast does) and transposes only the [G T, Dh]-sized operands.
    """
    return _cpu_attention_fwd(q, k, v, mask)[0]


def _cpu_attention_fwd(q: Array, k: Array, v: Array, mask: Array):
    T, K = q.shape[1], k.shape[2]
    qf = _gemm_operand(_fold_heads(q, K))
    kf, vf = (_gemm_operand(x.transpose(0, 2, 1, 3)) for x in (k, v))  # [B, K, S, Dh]
    scores = _by_group(_bdot_nt(qf, kf) * (1.0 / math.sqrt(q.shape[-1])), T)
    probs = softmax(jnp.where(mask[:, None, None], scores, _MASKED_SCORE), axis=-1)
    probs = probs.reshape(*qf.shape[:-1], -1)  # [B, K, G T, S]
    out = _bdot_nn(_gemm_operand(probs.astype(q.dtype)), vf)  # [B, K, G T, Dh] fp32
    return _unfold_heads(out.astype(q.dtype), T), (qf, kf, vf, mask, probs, out)


def _cpu_attention_bwd(res, g: Array):
    qf, kf, vf, mask, probs, out = res
    dt, T = qf.dtype, g.shape[1]
    gf = _gemm_operand(_fold_heads(g.astype(dt), kf.shape[1]))
    dprobs = _bdot_nt(gf, vf)  # [B, K, G T, S]
    # softmax VJP: p * (dp - sum_s p dp), and sum_s p dp = g . out (FlashAttention's D)
    delta = jnp.sum(gf.astype(jnp.float32) * out, axis=-1, keepdims=True)
    grouped = lambda x: _by_group(x, T)
    dscores = jnp.where(mask[:, None, None], grouped(probs) * (grouped(dprobs) - grouped(delta)), 0.0)
    ds = _gemm_operand((dscores * (1.0 / math.sqrt(qf.shape[-1]))).astype(dt).reshape(probs.shape))
    dq = _bdot_nn(ds, kf)  # [B, K, G T, Dh]
    if dt == jnp.float32:
        dk, dv = _bdot_tn(ds, qf), _bdot_tn(probs, gf)  # [B, K, S, Dh]
    else:
        # dK^T = Q^T dS and dV^T = dO^T P: the transposes fall on the [G T, Dh] operands. The
        # products pass a barrier before they are transposed back, or XLA folds that transpose into
        # the dot.
        t = lambda x: _row_major(jnp.swapaxes(x, -1, -2))
        dk_t = jax.lax.optimization_barrier(_bdot_nn(t(qf), ds))  # [B, K, Dh, S]
        dv_t = jax.lax.optimization_barrier(_bdot_nn(t(gf), _row_major(probs.astype(dt))))
        dk, dv = (jnp.swapaxes(x, -1, -2) for x in (dk_t, dv_t))
    dk, dv = (x.transpose(0, 2, 1, 3).astype(dt) for x in (dk, dv))  # [B, S, K, Dh]
    return _unfold_heads(dq.astype(dt), T), dk, dv, None


_cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)


SPLASH_BLOCK = 128  # splash kernel tile (queries and keys); the sequence must be a multiple of it


def splash_applicable(
    shape: tuple[int, int],
    config: ModelConfig,
    branched: bool,
    mesh: Mesh | None,
    rules: Rules,
) -> bool:
    """Whether the training forward of a ``[B, T]`` batch can use :func:`splash_attention`: the
    kernel expresses "causal within a segment" only (no shared-prompt branches, no sliding window),
    tiles T by ``SPLASH_BLOCK``, and runs per device on whole sequences and whole query groups (the
    sequence not sharded; q and kv heads sharded alike). A trace-time decision on static shapes."""
    if config.attention_kernel == "xla" or branched or config.sliding_window is not None:
        return False
    if config.attention_kernel == "auto" and jax.default_backend() != "tpu":
        return False
    B, T = shape
    if T % SPLASH_BLOCK:
        return False
    if mesh is None:
        return True
    H, K, Dh = config.num_heads, config.num_kv_heads, config.head_dim
    q_spec = fit_spec((B, T, H, Dh), ("batch", "length", "act_heads", None), mesh, rules)
    k_spec = fit_spec((B, T, K, Dh), ("batch", "length", "act_kv_heads", None), mesh, rules)
    return q_spec[1] is None and q_spec[0] == k_spec[0] and q_spec[2] == k_spec[2]


def splash_attention(
    q: Array, k: Array, v: Array, segment_ids: Array, *, mesh: Mesh | None = None, rules: Rules = ()
) -> Array:
    """Causal, segment-masked grouped-query attention with the Pallas splash kernel (TPU flash
    attention; interpret mode on other backends, where it is only for tests).

    q: [B, T, H, Dh]; k, v: [B, T, K, Dh]; segment_ids [B, T]. allowed(i, j) = j <= i and
    seg[i] == seg[j]: the rule of :func:`attention_mask` for rows without branches (padding queries,
    seg 0, attend among themselves: finite outputs that nothing reads). Each kv head serves its H/K
    query heads through the kernel's multi-query form (no repeated k/v). On a mesh the kernel runs
    per device under ``shard_map`` (batch and heads split as the activations are; see
    :func:`splash_applicable`). Returns [B, T, H, Dh] in q's dtype.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    T, Dh = q.shape[1], q.shape[-1]
    interpret = jax.default_backend() != "tpu"
    b = SPLASH_BLOCK
    sizes = splash.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip

    def local(q: Array, k: Array, v: Array, seg: Array) -> Array:
        rows, _, heads, _ = q.shape
        kv_heads = k.shape[2]
        group = heads // kv_heads
        mask = masks.MultiHeadMask([masks.CausalMask((T, T))] * group)
        kernel = splash.make_splash_mqa(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )
        q = (q * (1.0 / math.sqrt(Dh))).reshape(rows, T, kv_heads, group, Dh).transpose(0, 2, 3, 1, 4)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [rows, K, T, Dh]

        def one_row(q, k, v, seg):  # q [K, G, T, Dh]; k, v [K, T, Dh]
            ids = splash.SegmentIds(q=seg, kv=seg)
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

        out = jax.vmap(one_row)(q, k, v, seg)  # [rows, K, G, T, Dh]
        return out.transpose(0, 3, 1, 2, 4).reshape(rows, T, heads, Dh)

    if mesh is None:
        return local(q, k, v, segment_ids)
    q_spec = fit_spec(q.shape, ("batch", "length", "act_heads", None), mesh, rules)
    k_spec = fit_spec(k.shape, ("batch", "length", "act_kv_heads", None), mesh, rules)
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, k_spec, k_spec, PartitionSpec(q_spec[0], None)),
        out_specs=q_spec,
        check_vma=False,
    )
    return sharded(q, k, v, segment_ids)


# 2-D matmuls in the three forms a dense layer's forward and backward need, each accumulating in
# fp32 into an fp32 result. Why these forms: XLA:CPU hands a bf16 dot to YNNPACK (AMX where the CPU
# has it) only when both operands are row-major and the contraction is a's last dim with b's first or
# last; any other dot -- including one with a transpose XLA folded into an operand -- it turns into
# an fp32 dot, 3-7x slower (docs/benchmarks.md).


def _row_major(a: Array) -> Array:
    """a materialised row-major on the CPU backend (elsewhere a itself): it passes a barrier with a
    unit axis in front, so the simplifier can neither fold the transpose or convert that made it back
    into a dot as a transposed or fp32 operand nor see through it as a bitcast (a plain
    ``barrier(a.T)`` still reached the dot column-major)."""
    if jax.default_backend() != "cpu":
        return a
    return jax.lax.optimization_barrier(a[None])[0]


def _dot(a: Array, b: Array) -> Array:
    """a [M, K] @ b [K, N]."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _dot_nt(a: Array, b: Array) -> Array:
    """a [M, K] @ b [N, K]^T, contracting both last dims (no transpose of b is formed)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a: Array, b: Array) -> Array:
    """a [K, M]^T @ b [K, N]; for bf16/fp16 on the CPU backend with a^T materialised row-major
    (:func:`_row_major`), which YNNPACK's bf16 kernels need.

    There the result passes a barrier too, because a caller that transposes it (a tied embedding's
    gradient) would otherwise get a dot of two transposed operands, which neither YNNPACK nor
    XLA:CPU's bf16 path runs ("Unsupported element type for DotThunk"). fp32, and every other
    backend: XLA's own dot, whose CPU gemm reads the transposed operand in place (materialising it
    was a strided loop fused with a's elementwise producer: 16 ms for the SwiGLU product of a
    bench-7m layer, 1.03-1.11x the fp32 DPO step without it; docs/benchmarks.md).
    """
    if jax.default_backend() != "cpu" or a.dtype == jnp.float32:
        return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(_dot(_row_major(a.T), b))


@jax.custom_vjp
def _dense_cpu(x: Array, kernel: Array) -> Array:
    """x [N, I] @ kernel [I, O]."""
    return _dot(x, kernel).astype(x.dtype)


def _dense_cpu_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
    return _dense_cpu(x, kernel), (x, kernel)


def _dense_cpu_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    # Why: XLA's transpose rule gives dW = x^T g with g transposed, which XLA:CPU fuses into the
    # elementwise producer of g (e.g. the SwiGLU backward): a strided loop that cost more than the
    # matmuls (profile in docs/benchmarks.md); and dx = g W^T with a folded transpose of W. The forms
    # above contract in place (dx) and transpose only x (dW), and only where bf16 kernels need it.
    x, kernel = res
    return _dot_nt(g, kernel).astype(x.dtype), _dot_tn(x, g).astype(kernel.dtype)


_dense_cpu.defvjp(_dense_cpu_fwd, _dense_cpu_bwd)


def dense(x: Array, kernel: Array, n_in: int) -> Array:
    """y = x . kernel contracting the last ``n_in`` dims of x with the first ``n_in`` of kernel.

    Same values and gradients everywhere; on the CPU backend the gradient goes through
    ``_dense_cpu_bwd`` (a trace-time choice: GPU/TPU keep XLA's own transpose rule). The output is
    named :data:`DENSE_OUTPUT`, which the ``dots`` and ``dots_no_batch`` remat policies keep.
    """
    if jax.default_backend() != "cpu":
        y = jnp.tensordot(x, kernel, axes=n_in)
    else:
        lead, out = x.shape[: x.ndim - n_in], kernel.shape[n_in:]
        fan_in = math.prod(kernel.shape[:n_in])
        y = _dense_cpu(x.reshape(-1, fan_in), kernel.reshape(fan_in, -1)).reshape(*lead, *out)
    return checkpoint_name(y, DENSE_OUTPUT)


@jax.custom_vjp
def mixed_precision_logits(hidden: Array, kernel: Array) -> Array:
    """hidden [..., D] @ kernel [D, *V] -> fp32 logits, with the matmuls in ``hidden.dtype``.

    The kernel is cast to the compute dtype (``hidden.dtype``) and products accumulate in fp32 into
    fp32 logits. The backward casts the fp32 logits cotangent to the compute dtype before its two
    matmuls (as under ``torch.autocast``, where the cotangent of ``logits.float()`` reaches the bf16
    matmul backward in bf16) and returns the kernel gradient from the fp32 accumulator in the kernel's
    own dtype. Why: XLA's transpose rule keeps the cotangent in fp32, so with bf16 compute dh and dW
    ran as two fp32 (TF32) ``[B T, V]`` gemms -- 14.5 of the 105 ms of the llama3-1b DPO step on an
    H200 (docs/benchmarks.md). fp32 ``hidden``: the plain fp32 matmul and its usual gradient.
    """
    h, w = _as_matrices(hidden, kernel)
    logits = _dot(h, _compute_kernel(w, hidden.dtype))
    return logits.reshape(*hidden.shape[:-1], *kernel.shape[1:])


def _compute_kernel(w: Array, dtype: Any) -> Array:
    """w cast to the compute dtype and, for bf16/fp16, materialised (:func:`_row_major`): a tied
    embedding's ``embedding.T`` otherwise reached XLA:CPU as a transposed operand and both head
    matmuls ran as fp32 gemms."""
    w = w.astype(dtype)
    return w if w.dtype == jnp.float32 else _row_major(w)


def _as_matrices(hidden: Array, kernel: Array) -> tuple[Array, Array]:
    """[N, D] and [D, V] views: plain 2-D matmuls (XLA:CPU runs bf16 x bf16 -> f32 dots only so)."""
    return hidden.reshape(-1, hidden.shape[-1]), kernel.reshape(kernel.shape[0], -1)


def _mixed_precision_logits_fwd(hidden: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
    return mixed_precision_logits(hidden, kernel), (hidden, kernel)


def _mixed_precision_logits_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    hidden, kernel = res
    h, w = _as_matrices(hidden, kernel)
    g = g.reshape(h.shape[0], w.shape[1]).astype(hidden.dtype)
    dh = _dot_nt(g, _compute_kernel(w, hidden.dtype))
    dw = _dot_tn(h, g)
    return dh.astype(hidden.dtype).reshape(hidden.shape), dw.astype(kernel.dtype).reshape(kernel.shape)


mixed_precision_logits.defvjp(_mixed_precision_logits_fwd, _mixed_precision_logits_bwd)


def _spec_axes(entry: Any) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def embed_lookup(table: Array, ids: Array, mesh: Mesh | None, rules: Rules) -> Array:
    """Rows ``table[ids]`` ([V, D] table, [B, T] ids -> [B, T, D]), sharded as activations.

    Why not a plain ``take``: the table is stored with ``embed`` over ``fsdp`` (and ``vocab`` over
    ``tensor``) while the batch is split over ``(data, fsdp)``, and XLA's SPMD partitioner cannot
    move the gather's embed-split output onto the batch axes on every mesh: on ``(2, 2, 2)`` it
    falls back to an "involuntary full rematerialization" (the gather's whole ``[B, T, D]`` output,
    and its cotangent in the backward, replicated on every device). Here each device looks up its rows
    explicitly (``shard_map``): the ids are all-gathered over the table's ``embed`` axis, each
    device reads its block of the table (its vocabulary rows, zeros for ids outside them, summed
    over the ``vocab`` axis: Megatron's vocab-parallel embedding), and an all-to-all over the
    ``embed`` axis trades the embed split for the batch split. Nothing of the table moves; its
    gradient is reduced over the axes the table is replicated on. Sharding rules outside that
    pattern (an activation or sequence split, a vocab axis that also splits the batch, several
    embed axes) keep XLA's own partitioning of a ``take``.
    """
    if mesh is None:
        return jnp.take(table, ids, axis=0)
    out_axes = ("batch", "length", "act_embed")
    vocab_e, embed_e = fit_spec(table.shape, ("vocab", "embed"), mesh, rules)
    batch_e, length_e, act_e = fit_spec((*ids.shape, table.shape[1]), out_axes, mesh, rules)
    vocab_a, embed_a, batch_a = _spec_axes(vocab_e), _spec_axes(embed_e), _spec_axes(batch_e)
    local_pattern = not (length_e or act_e or set(vocab_a) & set(batch_a) or len(embed_a) > 1)
    if not local_pattern or not (vocab_a or embed_a):
        return constrain(jnp.take(table, ids, axis=0), out_axes, mesh, rules)
    swap = tuple(a for a in embed_a if a in batch_a)  # the embed split traded for the batch split
    keep = tuple(a for a in embed_a if a not in batch_a)  # embed stays split (batch too small)
    vocab_rows = table.shape[0] // math.prod(mesh.shape[a] for a in vocab_a)

    def local(block: Array, rows: Array) -> Array:
        if swap:
            rows = jax.lax.all_gather(rows, swap, axis=0, tiled=True)
        if vocab_a:
            offset = jax.lax.axis_index(vocab_a) * vocab_rows
            inside = (rows >= offset) & (rows < offset + vocab_rows)
            x = jnp.take(block, jnp.where(inside, rows - offset, 0), axis=0)
            x = jax.lax.psum(jnp.where(inside[..., None], x, jnp.zeros((), x.dtype)), vocab_a)
        else:
            x = jnp.take(block, rows, axis=0)
        if swap:
            x = jax.lax.all_to_all(x, swap, split_axis=0, concat_axis=2, tiled=True)
        return x

    x = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(vocab_e, embed_e), PartitionSpec(batch_e, None)),
        out_specs=PartitionSpec(batch_e, None, keep[0] if keep else None),
    )(table, ids)
    return constrain(x, out_axes, mesh, rules)


def _init(axes: tuple[str | None, ...], init: Any = None) -> Any:
    return nn.with_logical_partitioning(init or nn.initializers.normal(0.02), axes)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32 ("Root Mean Square Layer Normalization",
    arXiv:1910.07467); HF order: normalise in fp32, cast to the input dtype, then scale."""

    eps: float
    param_dtype: Any
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", _init((self.axis_name,), nn.initializers.ones), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return _scale_features(scale, normed.astype(x.dtype))


@jax.custom_vjp
def _scale_features(scale: Array, x: Array) -> Array:
    """scale (param dtype) cast to x's dtype, times x [..., D]: HF's ``weight * hidden`` in the
    compute dtype. The gradient of ``scale`` sums fp32 products of g and x over every row. Why:
    autodiff multiplies g and x in the compute dtype and sums the rounded products; in bf16 those
    are 4096 x 256 products rounded to 8 bits each, and XLA:CPU's reduction over the leading dims of
    their upcast ran 7x slower than the fp32 sum (52 ms of a 0.97 s bench-7m bf16 DPO step). In
    fp32 it is autodiff's computation."""
    return scale.astype(x.dtype) * x


def _scale_features_fwd(scale: Array, x: Array) -> tuple[Array, tuple[Array, Array]]:
    return _scale_features(scale, x), (scale, x)


def _scale_features_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    scale, x = res
    products = g.astype(jnp.float32) * x.astype(jnp.float32)
    dscale = jnp.sum(products.reshape(-1, x.shape[-1]), axis=0)
    return dscale.astype(scale.dtype), g * scale.astype(g.dtype)


_scale_features.defvjp(_scale_features_fwd, _scale_features_bwd)


class Proj(nn.Module):
    """Linear map contracting the last ``len(in_axes)`` dims of x: kernel [*in, *out] (+ bias [*out]).

    Kept as its own module so a low-rank adapter can wrap it without touching the decoder.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    use_bias: bool
    dtype: Any
    param_dtype: Any
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in = len(self.in_shape)
        shape = self.in_shape + self.out_shape
        quantize = self.lora.quantize if self.lora is not None else "none"
        if quantize == "none":
            kernel = self.param("kernel", _init(self.axes), shape, self.param_dtype).astype(self.dtype)
        else:  # QLoRA: the frozen kernel stored quantized, dequantized in the compute dtype
            kernel = lora_lib.quantized_kernel(self, shape, self.axes, quantize, self.param_dtype, self.dtype)
        y = dense(x.astype(self.dtype), kernel, n_in)
        if self.use_bias:
            bias_axes = self.axes[n_in:]
            bias = self.param(
                "bias", _init(bias_axes, nn.initializers.zeros), self.out_shape, self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        # Adapters absent from the params (the base weights alone: LoRA's reference) are skipped.
        if self.lora is not None and (self.is_initializing() or self.has_variable("params", "lora_a")):
            y = y + lora_lib.adapter(self, x.astype(self.dtype), self.in_shape, self.out_shape, self.axes)
        return y


class Attention(nn.Module):
    config: ModelConfig
    mesh: Mesh | None = None
    rules: Rules = ()

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        rope: tuple[Array, Array],
        mask: Array | None,
        cache: dict | None,
        segment_ids: Array,
    ):
        """``rope``: :func:`rope_tables` of ``positions``. ``mask`` (``attention_mask``) for the
        XLA/cuDNN paths; ``None`` with no cache selects :func:`splash_attention` on ``segment_ids``
        (the decoder's ``splash_applicable`` choice)."""
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        B, T = x.shape[:2]
        proj = lambda name, out, axes, bias: Proj(
            (D,), out, axes, bias, dt, pdt, lora_lib.target(cfg, name, "self_attn"), name=name
        )
        q = proj("q_proj", (H, Dh), ("embed", "heads", "head_dim"), cfg.attention_bias)(x)
        k = proj("k_proj", (K, Dh), ("embed", "kv_heads", "head_dim"), cfg.attention_bias)(x)
        v = proj("v_proj", (K, Dh), ("embed", "kv_heads", "head_dim"), cfg.attention_bias)(x)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, pdt, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, pdt, name="k_norm")(k)
        q = constrain(apply_rope(q, rope), ("batch", "length", "act_heads", None), self.mesh, self.rules)
        k = constrain(
            apply_rope(k, rope),
            ("batch", "length", "act_kv_heads", None),
            self.mesh,
            self.rules,
        )
        v = constrain(v, ("batch", "length", "act_kv_heads", None), self.mesh, self.rules)
        new_cache = None
        if cache is not None:
            # Slot p holds position p; out-of-range positions are dropped, not clamped.
            rows = jnp.arange(B)[:, None]
            k_all = cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype), mode="drop")
            v_all = cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype), mode="drop")
            new_cache = {"k": k_all, "v": v_all}
            S = k_all.shape[1]
            slots = jnp.broadcast_to(jnp.arange(S)[None], (B, S))
            ones_q, ones_k = jnp.ones((B, T), jnp.int32), jnp.ones((B, S), jnp.int32)
            zeros_q, zeros_k = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
            mask = attention_mask(
                positions, slots, ones_q, ones_k, zeros_q, zeros_k, positions, slots, cfg.sliding_window
            )
            k, v = k_all.astype(dt), v_all.astype(dt)
        if mask is None:
            out = splash_attention(q, k, v, segment_ids, mesh=self.mesh, rules=self.rules)
        else:
            # Decoding keeps the XLA path: its mask is not the top-left causal one cuDNN's is_causal means.
            auto = cache is None and cfg.attention_kernel == "auto"
            impl = attention_implementation(q, k) if auto else "xla"
            # The full forward's mask is row-causal; the decoding mask (positions vs slots) is not.
            block = CAUSAL_BLOCK if cache is None else None
            out = attention_core(q, k, v, mask, implementation=impl, causal_block=block)
        out = constrain(out, ("batch", "length", "act_heads", None), self.mesh, self.rules)
        o = Proj(
            (H, Dh), (D,), ("heads", "head_dim", "embed"), cfg.attention_out_bias, dt, pdt,
            lora_lib.target(cfg, "o_proj", "self_attn"), name="o_proj",
        )  # fmt: skip
        return o(out), new_cache


def swiglu(gate: Array, up: Array) -> Array:
    """silu(gate) * up in the inputs' dtype, silu computed in fp32 and rounded once, as PyTorch's
    ``F.silu(gate) * up`` (and so HF's LlamaMLP) computes it on bf16 tensors: the same values but
    where the two libraries' fp32 silu straddle a bf16 rounding boundary. Why: ``jax.nn.silu``
    on bf16 rounds after each of its ops (35% of the products differed from PyTorch's), and its
    backward's chain of bf16 round trips cost 11 ms a layer of the bf16 bench-7m step on XLA:CPU
    (docs/benchmarks.md)."""
    return jax.nn.silu(gate.astype(jnp.float32)).astype(gate.dtype) * up


class MLP(nn.Module):
    """SwiGLU ("GLU Variants Improve Transformer", arXiv:2002.05202): down(silu(gate x) * up x)."""

    config: ModelConfig
    mesh: Mesh | None = None
    rules: Rules = ()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        D, F = cfg.hidden_size, cfg.intermediate_size
        lora = lambda name: lora_lib.target(cfg, name, "mlp")
        gate = Proj((D,), (F,), ("embed", "mlp"), False, dt, pdt, lora("gate_proj"), name="gate_proj")(x)
        up = Proj((D,), (F,), ("embed", "mlp"), False, dt, pdt, lora("up_proj"), name="up_proj")(x)
        h = constrain(swiglu(gate, up), ("batch", "length", "act_mlp"), self.mesh, self.rules)
        return Proj((F,), (D,), ("mlp", "embed"), False, dt, pdt, lora("down_proj"), name="down_proj")(h)


class DecoderLayer(nn.Module):
    config: ModelConfig
    mesh: Mesh | None = None
    rules: Rules = ()

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        rope: tuple[Array, Array],
        mask: Array | None,
        cache: dict | None,
        segment_ids: Array,
    ):
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, pdt, name="input_layernorm")(x)
        attention = Attention(cfg, self.mesh, self.rules, name="self_attn")
        attn, new_cache = attention(h, positions, rope, mask, cache, segment_ids)
        x = constrain(x + attn, ("batch", "length", "act_embed"), self.mesh, self.rules)
        h = RMSNorm(cfg.rms_norm_eps, pdt, name="post_attention_layernorm")(x)
        x = constrain(
            x + MLP(cfg, self.mesh, self.rules, name="mlp")(h),
            ("batch", "length", "act_embed"),
            self.mesh,
            self.rules,
        )
        return x, new_cache


_REMAT_POLICY = {
    "full": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots,
        jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT),
    ),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT),
    ),
}


class Decoder(nn.Module):
    """Token ids -> final normed hidden state [B, T, D] (and the updated cache when decoding).

    The unembedding (``lm_head`` kernel [D, V], or the tied embedding transposed) is applied by
    ``Model``, so log-prob code can chunk over the vocabulary.
    """

    config: ModelConfig
    mesh: Mesh | None = None
    rules: Rules = ()

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        positions: Array,
        segment_ids: Array,
        branch_ids: Array | None,
        cache: dict | None = None,
    ):
        """``branch_ids`` None: no shared-prompt branches (all zero; known at trace time)."""
        cfg = self.config
        branched = branch_ids is not None
        if branch_ids is None:
            branch_ids = jnp.zeros_like(input_ids)
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        embedding = self.param("embedding", _init(("vocab", "embed")), (cfg.vocab_size, cfg.hidden_size), pdt)
        x = embed_lookup(embedding, input_ids, self.mesh, self.rules).astype(dt)
        mask = None
        splash = cache is None and splash_applicable(input_ids.shape, cfg, branched, self.mesh, self.rules)
        if cache is None and not splash:
            index = jnp.broadcast_to(jnp.arange(input_ids.shape[1])[None], input_ids.shape)
            mask = attention_mask(
                index,
                index,
                segment_ids,
                segment_ids,
                branch_ids,
                branch_ids,
                positions,
                positions,
                cfg.sliding_window,
            )
        rope = rope_tables(positions, rope_inv_freq(cfg), dt)
        if cfg.scan_layers:
            x, new_cache = self._scanned_layers(x, positions, rope, mask, cache, segment_ids)
        else:
            x, new_cache = self._unrolled_layers(x, positions, rope, mask, cache, segment_ids)
        hidden = RMSNorm(cfg.rms_norm_eps, pdt, name="norm")(x)
        if not cfg.tie_word_embeddings:
            self.param("lm_head", _init(("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size), pdt)
        return hidden, new_cache

    def _unrolled_layers(self, x, positions, rope, mask, cache, segment_ids):
        """A Python loop over ``layers_0 .. layers_{L-1}``; the cache is ``{layers_i: {k, v}}``."""
        cfg = self.config
        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICY[cfg.remat], prevent_cse=True)
        new_cache = {} if cache is not None else None
        for i in range(cfg.num_layers):
            name = f"layers_{i}"
            layer_cache = cache[name] if cache is not None else None
            layer = layer_cls(cfg, self.mesh, self.rules, name=name)
            x, c = layer(x, positions, rope, mask, layer_cache, segment_ids)
            if cache is not None:
                new_cache[name] = c
        return x, new_cache

    def _scanned_layers(self, x, positions, rope, mask, cache, segment_ids):
        """One ``nn.scan`` over the layers: params ``layers/...`` stacked on a leading ``layers`` axis
        (one rng per layer at init), the hidden state as the carry, and the cache ``{"layers": {k, v}}``
        ``[L, B, S, K, Dh]`` scanned with the params (sliced per layer in, stacked out)."""
        cfg = self.config
        layer_cls = DecoderLayer
        if cfg.remat != "none":
            # Inside a scan XLA cannot CSE the recomputation across iterations, so the barriers
            # prevent_cse adds would only block fusion (flax's advice for remat under scan).
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICY[cfg.remat], prevent_cse=False)
        scanned = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        layer_cache = cache["layers"] if cache is not None else None
        x, c = scanned(cfg, self.mesh, self.rules, name="layers")(
            x, positions, rope, mask, layer_cache, segment_ids
        )
        return x, ({"layers": c} if cache is not None else None)


def stack_layers(params: Any, num_layers: int) -> Any:
    """Unrolled params (``layers_0 .. layers_{L-1}``) -> the scanned layout (``layers``, each leaf
    stacked on a new leading axis); other entries unchanged. Also converts a KV cache."""
    per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
    rest = {k: v for k, v in params.items() if not _is_layer_key(k)}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}


def unstack_layers(params: Any, num_layers: int) -> Any:
    """The scanned layout -> unrolled params (``layers_i`` = slice ``i`` of every ``layers`` leaf);
    the inverse of :func:`stack_layers`. Also converts a KV cache."""
    rest = {k: v for k, v in params.items() if k != "layers"}
    layers = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(num_layers)}
    return {**rest, **layers}


def _is_layer_key(key: str) -> bool:
    return key.startswith("layers_") and key[len("layers_") :].isdigit()
