"""Verifier-checked task accuracy of a policy under greedy decoding: the one loop behind the
quickstart's evaluation, the MCTS-DPO rounds' and the online jobs' held-out accuracy.

Decoding is :class:`alignjax.search.generate.Generator`'s (KV cache, bucketed shapes), the same code
that MCTS search and the rollouts sample with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from alignjax.search.generate import Generator


def completion_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decoded tokens, cut at the first EOS."""
    ids = list(ids)
    eos = int(tokenizer.eos_id)
    return tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)


def greedy_correct(
    generator: Generator,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    verify: Callable[[str, str], bool],
    *,
    max_new_tokens: int,
    prompt_ids: Callable[[str], Sequence[int]] | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """[N] bool: whether ``verify(prompt, answer)`` accepts each prompt's greedy answer (cut at EOS).

    ``prompt_ids`` encodes a prompt (default ``tokenizer.encode_prompt``, a chat template's generation
    prompt where the tokenizer has one, else ``tokenizer.encode``).
    """
    encode = prompt_ids or getattr(tokenizer, "encode_prompt", tokenizer.encode)
    eos = int(tokenizer.eos_id)
    correct = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        out = generator.generate(
            params,
            [[int(t) for t in encode(p)] for p in chunk],
            jax.random.PRNGKey(0),  # unused by greedy decoding
            max_new_tokens=max_new_tokens,
            greedy=True,
            stop_tokens=(eos,),
        )
        for j, prompt in enumerate(chunk):
            correct.append(bool(verify(prompt, completion_text(tokenizer, out.row(j, 0)[0]))))
    return np.array(correct, dtype=bool)


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
    """Share of ``records`` (``{"prompt", ...}``) whose greedy answer ``verify`` accepts; with
    ``group_key`` also the accuracy per value of that field (e.g. carry / no carry)."""
    generator = Generator(model, pad_id=tokenizer.pad_id)
    correct = greedy_correct(
        generator, params, tokenizer, [r["prompt"] for r in records], verify,
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )  # fmt: skip
    result = {"accuracy": float(correct.mean())}
    if group_key is not None:
        for value in sorted({r[group_key] for r in records}):
            mask = np.array([r[group_key] == value for r in records])
            result[f"accuracy/{group_key}={value}"] = float(correct[mask].mean())
    return result
