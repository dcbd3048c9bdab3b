"""Reward sources behind one batched interface, for online training and pair relabelling.

A source is called on a batch of :class:`Samples` (R prompt/completion pairs, as text and token ids)
and returns ``[R]`` float32 rewards (NaN = unscorable, which the advantages ignore):

- :class:`VerifierReward`: a function ``verify(prompt, completion) -> bool`` (the built-in arithmetic
  and multi-step verifiers of :mod:`alignjax.data.synthetic`, a GSM8K-style final-answer check), giving
  ``correct`` / ``wrong`` (1 / 0 by default);
- :class:`RewardModelReward`: an alignjax reward model (Bradley-Terry / Secrets-II / ensemble value head,
  ``experiments/reward_model.py``; load an exported one with :meth:`RewardModelReward.from_dir`), the
  head-mean reward of ``prompt + completion`` read at its last token;
- :class:`ImplicitDPOReward`: DPO's implicit reward ``beta (log pi(y|x) - log pi_ref(y|x))`` ("Direct
  Preference Optimization", Rafailov et al., arXiv:2305.18290, section 5) from a policy/reference pair;
- :class:`FollowUpLikelihoodReward`: Follow-up Likelihood as Reward ("Aligning Language Models Using
  Follow-up Likelihood as Reward Signal", Zhang et al., arXiv:2409.13948): the likelihood, under a
  language model, of a user's follow-up utterance after the response; with positive follow-ups F+
  (e.g. "Thanks, that's right.") and negative ones F- (e.g. "That's wrong."),
  ``r = mean_{f in F+} l(f | x, y) - mean_{f in F-} l(f | x, y)``, ``l`` the mean token log-prob
  of ``f`` (``length_normalize=False``: the summed log-prob).

:func:`normalize_rewards` whitens or centres them over the batch or per prompt group, and
:class:`Combined` sums weighted sources. Model-based sources run one jitted forward over padded rows
(row widths bucketed to powers of two, so a run compiles a few programs), with the params wherever
they live (sharded over the mesh or not).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from alignjax import logprobs
from alignjax.data import synthetic
from alignjax.reward.export import load_classifier
from alignjax.search.generate import bucket

NORMALIZATIONS = ("none", "batch", "group", "center")


@dataclasses.dataclass(frozen=True)
class Samples:
    """R prompt/completion pairs: texts and token ids (completion ids through the stop token)."""

    prompts: Sequence[str]
    completions: Sequence[str]
    prompt_ids: Sequence[Sequence[int]]
    completion_ids: Sequence[Sequence[int]]

    def __post_init__(self) -> None:
        n = {len(self.prompts), len(self.completions), len(self.prompt_ids), len(self.completion_ids)}
        if len(n) != 1:
            raise ValueError(f"Samples: fields have different lengths {sorted(n)}")

    def __len__(self) -> int:
        return len(self.prompts)


class RewardSource(Protocol):
    """``source(samples) -> [R] float32``."""

    def __call__(self, samples: Samples) -> np.ndarray: ...


# ------------------------------------------------------------------------------------------ verifiers


@dataclasses.dataclass
class VerifierReward:
    """``correct`` where ``verify(prompt, completion)`` holds, else ``wrong``."""

    verify: Callable[[str, str], bool]
    correct: float = 1.0
    wrong: float = 0.0

    def __call__(self, samples: Samples) -> np.ndarray:
        return np.array([self.correct if self.verify(p, c) else self.wrong
                         for p, c in zip(samples.prompts, samples.completions)], np.float32)


def _safe(verify: Callable[[str, str], bool]) -> Callable[[str, str], bool]:
    """A completion the verifier cannot parse is wrong, not an error."""

    def check(prompt: str, completion: str) -> bool:
        try:
            return bool(verify(prompt, completion))
        except ValueError:
            return False

    return check


def builtin_verifier(task: str) -> Callable[[str, str], bool]:
    """The verifier of a built-in task: ``arithmetic`` (``ab+cd=`` -> the units-first sum) or
    ``multistep`` (the final ``answer y`` line)."""

    table = {"arithmetic": synthetic.arithmetic_verify, "multistep": synthetic.multistep_verify}
    if task not in table:
        raise ValueError(f"unknown built-in verifier {task!r}; known: {sorted(table)}")
    return _safe(table[task])


def gsm8k_verifier(finals: dict[str, str]) -> Callable[[str, str], bool]:
    """GSM8K-style: the completion's final number (after ``####``) equals the prompt's reference
    ``finals[prompt]`` (:func:`alignjax.data.synthetic.gsm8k_verify`)."""

    return lambda prompt, completion: synthetic.gsm8k_verify(completion, finals[prompt])


# ------------------------------------------------------------------------------------------ model scores


def _rows(prefixes: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int = 0
          ) -> dict[str, np.ndarray]:
    """Padded rows ``prefix + target`` (width bucketed) with ``loss_mask`` on the target's tokens."""
    R = len(prefixes)
    width = bucket(max(len(p) + len(t) for p, t in zip(prefixes, targets)), 16)
    ids = np.full((R, width), pad_id, np.int32)
    seg = np.zeros((R, width), np.int32)
    mask = np.zeros((R, width), np.float32)
    ex = np.full((R, width), -1, np.int32)
    for r, (p, t) in enumerate(zip(prefixes, targets)):
        P, n = len(p), len(t)
        ids[r, :P + n] = list(p) + list(t)
        seg[r, :P + n] = 1
        mask[r, P:P + n] = 1
        ex[r, P:P + n] = r
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (R, width)).copy()
    return {"input_ids": ids, "positions": positions, "segment_ids": seg, "loss_mask": mask,
            "example_ids": ex}


class _Scorer:
    """Summed target log-probs ``log pi(target | prefix)`` [R] under a language model (one jit)."""

    def __init__(self, model: Any) -> None:
        self.model = model

        @jax.jit
        def score(params, batch):
            logits = model.apply(params, batch["input_ids"], positions=batch["positions"],
                                 segment_ids=batch["segment_ids"])
            lp = logprobs.next_token_logps(logits, batch["input_ids"])
            return jnp.sum(lp * batch["loss_mask"], axis=-1)

        self._score = score

    def __call__(self, params: Any, prefixes: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                 ) -> np.ndarray:
        if any(len(t) == 0 for t in targets):
            raise ValueError("a scored target has no tokens")
        batch = _rows(prefixes, targets)
        return np.asarray(self._score(params, {k: jnp.asarray(v) for k, v in batch.items()}), np.float32)


@dataclasses.dataclass
class ImplicitDPOReward:
    """``beta (log pi(y|x) - log pi_ref(y|x))`` of each completion (summed token log-probs)."""

    model: Any
    params: Any
    ref_params: Any
    beta: float = 0.1

    def __post_init__(self) -> None:
        self._scorer = _Scorer(self.model)

    def __call__(self, samples: Samples) -> np.ndarray:
        pi = self._scorer(self.params, samples.prompt_ids, samples.completion_ids)
        ref = self._scorer(self.ref_params, samples.prompt_ids, samples.completion_ids)
        return (self.beta * (pi - ref)).astype(np.float32)


@dataclasses.dataclass
class FollowUpLikelihoodReward:
    """FLR (see the module docstring): ``positive`` / ``negative`` follow-ups as token ids, appended after
    ``prompt + completion`` (plus ``separator`` ids, e.g. the chat template's user turn)."""

    model: Any
    params: Any
    positive: Sequence[Sequence[int]]
    negative: Sequence[Sequence[int]] = ()
    separator: Sequence[int] = ()
    length_normalize: bool = True

    def __post_init__(self) -> None:
        if not self.positive:
            raise ValueError("FollowUpLikelihoodReward: give at least one positive follow-up")
        self._scorer = _Scorer(self.model)

    def _mean(self, samples: Samples, follow_ups: Sequence[Sequence[int]]) -> np.ndarray:
        prefixes = [list(p) + list(c) + list(self.separator)
                    for p, c in zip(samples.prompt_ids, samples.completion_ids)]
        out = []
        for f in follow_ups:
            s = self._scorer(self.params, prefixes, [list(f)] * len(prefixes))
            out.append(s / len(f) if self.length_normalize else s)
        return np.mean(out, axis=0)

    def __call__(self, samples: Samples) -> np.ndarray:
        r = self._mean(samples, self.positive)
        if self.negative:
            r = r - self._mean(samples, self.negative)
        return r.astype(np.float32)


@dataclasses.dataclass
class RewardModelReward:
    """An alignjax :class:`alignjax.reward.model.RewardModel` (value head; the mean over an ensemble's
    heads) on ``prompt + completion``."""

    reward_model: Any
    params: Any

    def __post_init__(self) -> None:
        kind = self.reward_model.head_config.kind
        if kind != "value":
            raise ValueError(f"RewardModelReward: a {kind!r} head scores pairs, not single completions; use "
                             "a value-head (bt / secrets) reward model")
        rm = self.reward_model
        self._score = jax.jit(lambda params, batch: jnp.mean(rm.outputs(params, batch,
                                                                        batch["input_ids"].shape[0])["rewards"],
                                                             axis=-1))

    @classmethod
    def from_dir(cls, path: str, *, mesh: Any = None) -> RewardModelReward:
        """An exported reward model (``config.reward.export_dir`` of ``experiments/reward_model.py``)."""

        rm = load_classifier(path, mesh=mesh)
        return cls(rm, rm.params)

    def __call__(self, samples: Samples) -> np.ndarray:
        batch = _rows(samples.prompt_ids, samples.completion_ids)
        return np.asarray(self._score(self.params, {k: jnp.asarray(v) for k, v in batch.items()}), np.float32)


@dataclasses.dataclass
class Combined:
    """``sum_k w_k r_k`` of several sources (NaN where any is NaN)."""

    sources: Sequence[RewardSource]
    weights: Sequence[float] | None = None

    def __call__(self, samples: Samples) -> np.ndarray:
        w = self.weights or [1.0] * len(self.sources)
        return np.sum([wk * np.asarray(s(samples), np.float32) for wk, s in zip(w, self.sources)], axis=0)


# ------------------------------------------------------------------------------------------ normalisation


def normalize_rewards(rewards: np.ndarray, how: str = "none", *, num_generations: int = 1,
                      eps: float = 1e-8) -> np.ndarray:
    """``none``; ``batch``: ``(r - mean) / (std + eps)`` over the batch; ``group``: the same within each
    prompt's ``num_generations`` contiguous rows; ``center``: ``r - mean`` over the batch. NaNs are ignored
    and kept."""
    if how not in NORMALIZATIONS:
        raise ValueError(f"reward normalisation {how!r}: expected one of {NORMALIZATIONS}")
    r = np.asarray(rewards, np.float64)
    if how == "none":
        return r.astype(np.float32)
    if how == "center":
        return (r - np.nanmean(r)).astype(np.float32)
    x = r.reshape(-1, num_generations) if how == "group" else r[None]
    mean = np.nanmean(x, axis=1, keepdims=True)
    std = np.nanstd(x, axis=1, keepdims=True)
    return ((x - mean) / (std + eps)).reshape(r.shape).astype(np.float32)
