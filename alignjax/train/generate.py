"""Verifier-checked task accuracy of a policy under greedy decoding (the quickstart's evaluation).

Decoding is :class:`alignjax.search.generate.Generator`'s (KV cache, bucketed shapes), the same code
that MCTS search samples with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from alignjax.search.generate import Generator


def task_accuracy(
    model: Any,
    params: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    verify: Callable[[str, str], bool],
    *,
    max_new_tokens: int,
    group_key: str | None = None,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Share of ``records`` (``{"prompt", ...}``) whose greedy answer (cut at EOS) ``verify`` accepts;
    with ``group_key`` also the accuracy per value of that field (e.g. carry / no carry)."""
    generator = Generator(model, pad_id=tokenizer.pad_id)
    eos = int(tokenizer.eos_id)
    correct = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        out = generator.generate(
            params,
            [tokenizer.encode_prompt(r["prompt"]) for r in chunk],
            jax.random.PRNGKey(0),  # unused by greedy decoding
            max_new_tokens=max_new_tokens,
            greedy=True,
            stop_tokens=(eos,),
        )
        for j, record in enumerate(chunk):
            ids, _ = out.row(j, 0)
            ids = ids[: ids.index(eos)] if eos in ids else ids
            correct.append(bool(verify(record["prompt"], tokenizer.decode(ids))))
    correct_arr = np.array(correct)
    result = {"accuracy": float(correct_arr.mean())}
    if group_key is not None:
        for value in sorted({r[group_key] for r in records}):
            mask = np.array([r[group_key] == value for r in records])
            result[f"accuracy/{group_key}={value}"] = float(correct_arr[mask].mean())
    return result
