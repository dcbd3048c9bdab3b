"""Greedy generation for short task answers, and verifier-checked task accuracy.

For the embedded default's 10-token sequences a full-recompute loop (one forward over the fixed
``[N, prompt + new]`` buffer per new token; causal attention makes the not-yet-written tail
irrelevant) is as fast as a KV cache and has no cache bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def greedy_generate(model: Any, params: Any, prompts: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """``prompts`` [N, P] (equal lengths) -> the greedy continuation [N, max_new_tokens].

    ``tokens[:, P + i] = argmax_v logits[:, P + i - 1, v]`` with logits of the buffer so far.
    """
    n, p = prompts.shape

    @jax.jit
    def run(params: Any, prompts: jax.Array) -> jax.Array:
        buf = jnp.concatenate([prompts, jnp.zeros((n, max_new_tokens), prompts.dtype)], axis=1)

        def body(i, buf):
            logits = model.apply(params, buf)
            nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False), -1)
            return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype), p + i, axis=1)

        return jax.lax.fori_loop(0, max_new_tokens, body, buf)[:, p:]

    return np.asarray(run(params, jnp.asarray(prompts, jnp.int32)))


def task_accuracy(
    model: Any,
    params: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    verify: Callable[[str, str], bool],
    *,
    max_new_tokens: int,
    group_key: str | None = None,
) -> dict[str, float]:
    """Share of ``records`` (``{"prompt", ...}``) whose greedy answer (cut at EOS) ``verify`` accepts;
    with ``group_key`` also the accuracy per value of that field (e.g. carry / no carry)."""
    prompts = np.array([tokenizer.encode_prompt(r["prompt"]) for r in records], np.int32)
    out = greedy_generate(model, params, prompts, max_new_tokens)
    eos = tokenizer.eos_id
    correct = []
    for r, ids in zip(records, out):
        ids = list(ids)
        ids = ids[: ids.index(eos)] if eos in ids else ids
        correct.append(bool(verify(r["prompt"], tokenizer.decode(ids))))
    correct_arr = np.array(correct)
    result = {"accuracy": float(correct_arr.mean())}
    if group_key is not None:
        for value in sorted({r[group_key] for r in records}):
            mask = np.array([r[group_key] == value for r in records])
            result[f"accuracy/{group_key}={value}"] = float(correct_arr[mask].mean())
    return result
