"""Rollouts for online training: G sampled completions per prompt from the current policy, as a
sequence batch with the behaviour log-probs the policy-gradient losses compare against.

Generation is :class:`alignjax.search.generate.Generator` (the one KV-cache sampling path): the policy's
params stay where the train state keeps them (sharded over the mesh; the jitted sampler takes them as
they are, no host copy of the weights), prompts and sampled tokens are the only host traffic.
``sample(generator, params, prompts, key, config)`` -> :class:`Rollout`; :func:`sequence_batch` lays
it out as padded rows ``prompt + completion`` (the sequence-batch layout of ``WORKSPACE.md``), with

- ``loss_mask`` 1 on the completion's tokens (through the stop token),
- ``old_token_logps`` the behaviour log-probs ``log softmax(logits / T)[token]`` at the same positions
  (the temperature-scaled, untruncated distribution, as TRL's GRPOTrainer recomputes it),
- ``stopped`` 1 where a stop token ended the completion (0: ``max_new_tokens`` ran out).

Row ``i G + j`` is prompt ``i``'s sample ``j``, so the group of prompt ``i`` is contiguous. Row ``r``
draws with keys folded from ``(key, r)``: a rollout depends only on the params, the prompts and the key.
:func:`teacher_forced_logps` recomputes the same log-probs from a full forward of the rows (what the
train step does, and what the tests compare the sampler with).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alignjax import logprobs
from alignjax.search.generate import Generator


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How completions are drawn: ``num_generations`` per prompt (TRL's name), at most
    ``max_new_tokens`` each (TRL's ``max_completion_length``), temperature / top-k (0 = off) / top-p,
    stopping after any of ``stop_tokens`` (e.g. EOS; kept as the completion's last token)."""

    num_generations: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclasses.dataclass
class Rollout:
    """``N`` prompts x ``G`` samples; every ``[R, M]`` array has rows ``R = N G`` (row ``i G + j``)."""

    prompt_ids: list[list[int]]  # N prompts
    completion_ids: np.ndarray  # [R, M] int32, pad after the end
    completion_mask: np.ndarray  # [R, M] float32, 1 through the stop token
    behaviour_logps: np.ndarray  # [R, M] log softmax(logits / T)[token], 0 after the end
    policy_logps: np.ndarray  # [R, M] log softmax(logits)[token] (temperature 1)
    stopped: np.ndarray  # [R] bool
    num_generations: int

    @property
    def lengths(self) -> np.ndarray:
        return self.completion_mask.sum(-1).astype(np.int32)

    def completions(self) -> list[list[int]]:
        """Each row's completion tokens (through the stop token)."""
        return [[int(t) for t in row[:n]] for row, n in zip(self.completion_ids, self.lengths)]

    def repeated_prompts(self) -> list[list[int]]:
        """Row ``r``'s prompt (each prompt repeated G times)."""
        return [p for p in self.prompt_ids for _ in range(self.num_generations)]


def sample(generator: Generator, params: Any, prompts: Sequence[Sequence[int]], key: jax.Array,
           config: SamplingConfig) -> Rollout:
    """``config.num_generations`` completions of every prompt under ``params`` (see the module docstring)."""
    out = generator.generate(
        params, prompts, key, num_samples=config.num_generations, max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        stop_tokens=config.stop_tokens)
    N, G, M = out.tokens.shape
    mask = (np.arange(M)[None, None] < out.lengths[..., None]).astype(np.float32)
    flat = lambda x: np.asarray(x).reshape(N * G, *np.shape(x)[2:])
    return Rollout([list(map(int, p)) for p in prompts], flat(out.tokens), flat(mask),
                   flat(out.sample_logps) * flat(mask), flat(out.logps) * flat(mask), flat(out.stopped), G)


def sequence_batch(rollout: Rollout, width: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Padded rows ``prompt + completion`` of ``width`` tokens: ``input_ids``, ``positions``,
    ``segment_ids``, ``loss_mask``, ``example_ids`` (the row on its completion tokens, else -1),
    ``old_token_logps`` (behaviour log-probs at their tokens' positions) and ``stopped`` [R]."""
    prompts, comps = rollout.repeated_prompts(), rollout.completions()
    R = len(comps)
    longest = max(len(p) + len(c) for p, c in zip(prompts, comps))
    if longest > width:
        raise ValueError(f"a prompt + completion has {longest} tokens, more than the row width {width}")
    ids = np.full((R, width), pad_id, np.int32)
    seg = np.zeros((R, width), np.int32)
    loss_mask = np.zeros((R, width), np.float32)
    old = np.zeros((R, width), np.float32)
    ex = np.full((R, width), -1, np.int32)
    for r, (p, c) in enumerate(zip(prompts, comps)):
        P, n = len(p), len(c)
        ids[r, :P], ids[r, P:P + n] = p, c
        seg[r, :P + n] = 1
        loss_mask[r, P:P + n] = 1
        ex[r, P:P + n] = r
        old[r, P:P + n] = rollout.behaviour_logps[r, :n]
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (R, width)).copy()
    return {"input_ids": ids, "positions": positions, "segment_ids": seg, "loss_mask": loss_mask,
            "example_ids": ex, "old_token_logps": old, "stopped": rollout.stopped.astype(np.float32)}


def teacher_forced_logps(model: Any, params: Any, batch: dict[str, jax.Array], temperature: float = 1.0
                         ) -> jax.Array:
    """[R, T] ``log softmax(logits / T)`` of each row's tokens from one full forward (0 at position 0),
    aligned with ``input_ids``; multiply by ``loss_mask`` for the completion's."""
    logits = model.apply(params, batch["input_ids"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    return logprobs.next_token_logps(logits.astype(jnp.float32) / temperature, batch["input_ids"])


def prompts_from_batch(batch: dict[str, np.ndarray]) -> list[list[int]]:
    """The prompt of every row of a padded ``sft``/``pairwise`` data batch: the row's tokens before its
    first completion token (``loss_mask``), for the chosen/first sequences only."""
    ids, mask, seg = (np.asarray(batch[k]) for k in ("input_ids", "loss_mask", "segment_ids"))
    out = []
    for r in range(ids.shape[0]):
        on = np.flatnonzero(mask[r] > 0)
        end = int(on[0]) if on.size else int(np.sum(seg[r] > 0))
        out.append([int(t) for t in ids[r, :end]])
    return out
