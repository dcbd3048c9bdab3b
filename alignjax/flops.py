"""Model FLOPs of a training step, for throughput and MFU (the train loop's ``perf/*`` metrics, bench/).

What is counted (the convention of PaLM's MFU, arXiv:2204.02311, Appendix B, with attention counted
over the pairs the mask allows):

* ``N`` = every weight that takes part in a matmul per token: attention and MLP projections, norms,
  and the ``D x V`` unembedding (counted even when tied to the embedding, and only when the step runs
  it: reward models replace it with a small head); the embedding lookup does no FLOPs;
* the trained forward + backward: ``6 N`` per non-padding row token, plus attention's score and value
  matmuls, ``4 H Dh`` per allowed (query, key) pair per layer forward, times 3;
* a reference forward (frozen or EMA reference): ``2 N`` per token plus the forward attention;
* with LoRA (``config.lora``) the frozen weights get no weight gradient: ``4 N + 6 A`` per token for
  the trained forward + backward, ``A`` the adapters' parameters (``r (in + out)`` per adapted
  projection).

Not counted: padding, rematerialisation and chunked-log-prob recomputation, softmax / norm /
elementwise work, the optimizer update. MFU = model FLOPs per second / the device's peak.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "PEAK_BF16_TFLOPS",
    "param_counts",
    "attention_pairs",
    "step_flops",
    "peak_flops_per_device",
]

# Dense bf16 peak per device by datasheet (TFLOP/s), keyed by a substring of ``device_kind``.
PEAK_BF16_TFLOPS = {
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v6 lite": 918.0,
}


def param_counts(config: Any) -> dict[str, int]:
    """Parameter counts of a ``ModelConfig``: ``non_embedding`` (projections and norms),
    ``unembedding`` (``D x V``), ``N = non_embedding + unembedding`` (the per-token matmul weights of
    a language-model forward), ``embedding``, ``adapters`` (LoRA's ``A`` and ``B``, 0 without) and
    ``total`` (stored parameters)."""
    c = config
    D, H, K, Dh, F, L, V = (
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.num_layers,
        c.vocab_size,
    )
    attn = D * H * Dh + 2 * D * K * Dh + H * Dh * D
    attn += (H * Dh + 2 * K * Dh) * c.attention_bias + D * c.attention_out_bias + 2 * Dh * c.qk_norm
    per_layer = attn + 3 * D * F + 2 * D
    non_embedding = L * per_layer + D
    unembedding = D * V
    lora = getattr(c, "lora", None)
    adapters = 0
    if lora is not None:
        shapes = {
            ("self_attn", "q_proj"): (D, H * Dh),
            ("self_attn", "k_proj"): (D, K * Dh),
            ("self_attn", "v_proj"): (D, K * Dh),
            ("self_attn", "o_proj"): (H * Dh, D),
            ("mlp", "gate_proj"): (D, F),
            ("mlp", "up_proj"): (D, F),
            ("mlp", "down_proj"): (F, D),
        }
        adapters = L * sum(lora.rank * (i + o) for (p, n), (i, o) in shapes.items() if lora.applies(n, p))
    return dict(
        non_embedding=non_embedding,
        unembedding=unembedding,
        N=non_embedding + unembedding,
        embedding=V * D,
        adapters=adapters,
        total=non_embedding + V * D + (0 if c.tie_word_embeddings else unembedding) + adapters,
    )


def attention_pairs(batch: Mapping[str, np.ndarray]) -> int:
    """(query, key) pairs the attention rule allows (``alignjax.models.transformer``: causal, same
    segment, a branch sees the shared prompt and itself): the useful attention work, not ``T^2``.

    In closed form per segment, from token counts alone (O(R T), cheap enough for every step): a
    segment of ``L`` tokens has ``L (L + 1) / 2`` pairs; with shared-prompt branches (the prompt,
    branch 0, comes first), ``p (p + 1) / 2`` for the prompt plus ``c p + c (c + 1) / 2`` for each
    branch of ``c`` tokens.
    """
    seg = np.asarray(batch["segment_ids"]).astype(np.int64)
    branch = batch.get("branch_ids")
    branch = np.zeros_like(seg) if branch is None else np.asarray(branch).astype(np.int64)
    real = seg > 0
    num_segments, num_branches = int(seg.max()) + 1, int(branch.max()) + 1
    rows = np.broadcast_to(np.arange(seg.shape[0])[:, None], seg.shape)
    # token counts per (row, segment, branch) in one pass: [row * segment, branch]
    key = (rows[real] * num_segments + seg[real]) * num_branches + branch[real]
    size = seg.shape[0] * num_segments * num_branches
    counts = np.bincount(key, minlength=size).reshape(-1, num_branches)
    p, c = counts[:, :1], counts[:, 1:]
    return int(np.sum(p * (p + 1) // 2) + np.sum(c * p + c * (c + 1) // 2))


def step_flops(
    config: Any, batch: Mapping[str, np.ndarray], *, reference_forward: bool, lm_head: bool = True
) -> dict[str, float]:
    """Model FLOPs of one training step on ``batch`` (a sequence batch; see the module docstring):
    ``policy`` (forward + backward), ``reference`` (its forward, 0 without one), ``total`` and
    ``row_tokens`` (non-padding tokens). ``lm_head=False``: no unembedding matmul (reward models)."""
    counts = param_counts(config)
    n = counts["N"] if lm_head else counts["non_embedding"]
    tokens = int(np.sum(np.asarray(batch["segment_ids"]) > 0))
    attn_fwd = 4 * config.num_heads * config.head_dim * config.num_layers * attention_pairs(batch)
    if counts["adapters"]:  # LoRA: no weight gradient of the frozen base
        policy = (4 * n + 6 * counts["adapters"]) * tokens + 3 * attn_fwd
    else:
        policy = 6 * n * tokens + 3 * attn_fwd
    ref = (2 * n * tokens + attn_fwd) if reference_forward else 0
    return dict(policy=float(policy), reference=float(ref), total=float(policy + ref), row_tokens=tokens)


def peak_flops_per_device(device_kind: str) -> float | None:
    """The datasheet dense bf16 peak (FLOP/s) of a device kind in :data:`PEAK_BF16_TFLOPS`, else None."""
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in device_kind), None)
