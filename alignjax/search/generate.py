"""Batched sampling with the model's KV cache, and self-evaluation, at fixed shapes.

``Generator(model).generate(params, prompts, key, num_samples=n, ...)``:

* prompts (lists of token ids) are right-padded to a length bucket ``P`` and the batch to a size bucket
  ``B`` (powers of two by default), so two calls whose prompts fall in the same buckets reuse one
  compiled program (``Generator.num_traces`` counts traces; a Python side effect inside the jitted
  function);
* the prompt KV is computed ONCE per prompt (prefill of ``[B, P]``), then the cache rows are repeated
  ``n`` times so all children of a node share it; the decode loop is a ``lax.while_loop`` over a fixed
  ``[B n, P + max_new_tokens]`` cache that exits as soon as every row has stopped; temperature, top-p,
  greedy and the stop ids are traced data, so only the buckets, ``n`` and ``max_new_tokens`` key programs;
* sampling: temperature, top-k, nucleus (top-p), in that order (as ``transformers``' logits warpers), or
  greedy; row ``r`` (= prompt ``i`` x n + sample ``j``) at step
  ``t`` draws with ``fold_in(fold_in(key, r), t)``, so a row's tokens depend only on its own prompt, the key
  and its index, not on the batch padding or on which other prompts share the call;
* a row stops after emitting one of ``stop_tokens`` (kept as the step's last token; e.g. the ``"\\n"`` step
  delimiter and EOS) or after ``max_new_tokens``;
* returned log-probs are those of the POLICY, ``log softmax(logits)[token]`` at temperature 1 without
  top-p truncation (fp32): the quantity MCTS priors and DPO use, whatever the sampling settings;
  ``sample_logps`` are those of the temperature-scaled distribution, ``log softmax(logits / T)[token]``
  (no top-k/top-p truncation): the behaviour log-probs an online RL step compares its policy with, the
  quantity TRL's GRPOTrainer recomputes (it divides the logits by the temperature too).

Self-evaluation (MCTS-DPO, arXiv:2405.00451): ``P(correct)`` is the model's next-token probability of a
"yes" token after an evaluation prompt, normalised against a "no" token:
``p = P(yes) / (P(yes) + P(no))`` (``no_id=None``: the raw ``P(yes)``). The prompt is built by a caller
function ``eval_prompt_fn(prefix) -> token ids``; the default format is
``prefix_text + SelfEvalFormat.suffix`` followed by the yes/no token (see :class:`SelfEvalFormat`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def bucket(n: int, minimum: int = 8) -> int:
    """The smallest power of two >= max(n, minimum)."""
    b = max(1, int(minimum))
    while b < n:
        b *= 2
    return b


def top_p_mask(logits_BxV: Array, top_p: Array) -> Array:
    """Logits with the tokens outside the nucleus set to -inf (keeps the smallest prefix of the sorted
    distribution whose mass reaches ``top_p``; the most likely token is always kept)."""
    probs = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
    sorted_p = -jnp.sort(-probs, axis=-1)
    cum = jnp.cumsum(sorted_p, axis=-1)
    # mass strictly before each sorted token < top_p  -> token kept
    keep_sorted = (cum - sorted_p) < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_p, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs >= threshold, logits_BxV, -jnp.inf)


def top_k_mask(logits_BxV: Array, top_k: Array) -> Array:
    """Logits outside the ``top_k`` largest set to -inf (ties at the k-th value kept); ``top_k <= 0``
    keeps all (a traced int, so one program serves every k)."""
    V = logits_BxV.shape[-1]
    k = jnp.clip(top_k, 1, V)
    kth = jnp.take_along_axis(-jnp.sort(-logits_BxV, axis=-1), jnp.full(logits_BxV.shape[:-1] + (1,), k - 1),
                              axis=-1)
    return jnp.where((top_k <= 0) | (logits_BxV >= kth), logits_BxV, -jnp.inf)


def sample_next(logits_BxV: Array, keys_B: Array, temperature: Array, top_p: Array,
                greedy: Array | bool, top_k: Array | int = 0) -> tuple[Array, Array]:
    """One token per row and its POLICY log-prob ``log softmax(logits)[token]`` (fp32).

    ``keys_B``: one PRNG key per row. Sampling uses ``logits / temperature`` truncated to the ``top_k`` most
    likely tokens (0 = all), then to the top-p nucleus;
    ``greedy`` (a traced bool, so one program serves both) takes the argmax instead.
    """
    logits = logits_BxV.astype(jnp.float32)
    top_k = jnp.asarray(top_k, jnp.int32)
    # The masks sort the vocabulary (most of a decode step's time on CPU at a 32k vocabulary): a
    # cond skips them when they keep every token.
    scaled = jax.lax.cond(top_k > 0, top_k_mask, lambda x, _: x, logits / temperature, top_k)
    scaled = jax.lax.cond(top_p < 1, top_p_mask, lambda x, _: x, scaled, jnp.asarray(top_p, jnp.float32))
    sampled = jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys_B, scaled)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logp


def row_keys(key: Array, rows: Array, step: Array) -> Array:
    """``fold_in(fold_in(key, row), step)`` for each row id."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(rows)


class Generation(NamedTuple):
    """Host (NumPy) results for ``N`` prompts x ``n`` samples.

    ``tokens`` [N, n, M] int32 (pad after the end), ``logps`` [N, n, M] float32 (0 after the end),
    ``lengths`` [N, n] generated tokens including the stop token, ``stopped`` [N, n] True when a stop token
    ended the row (False: ``max_new_tokens`` ran out), ``sample_logps`` [N, n, M] the temperature-scaled
    log-probs (the module docstring).
    """

    tokens: np.ndarray
    logps: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    sample_logps: np.ndarray | None = None

    def row(self, i: int, j: int) -> tuple[list[int], np.ndarray]:
        """(tokens, per-token log-probs) of prompt ``i``'s sample ``j``, trimmed to its length."""
        n = int(self.lengths[i, j])
        return [int(t) for t in self.tokens[i, j, :n]], self.logps[i, j, :n]


@dataclasses.dataclass(frozen=True)
class SelfEvalFormat:
    """The self-evaluation prompt: ``prefix_text + suffix``, then the next token is scored.

    The default suits the char-level synthetic tasks (whose alphabets lack letters for "yes"): after
    ``"\\n="`` the model judges with ``"1"`` (correct) against ``"0"``. For a real chat model use e.g.
    ``SelfEvalFormat("\\nIs the reasoning above correct? Answer yes or no: ", "yes", "no")``; the first
    token of ``yes``/``no`` is what gets scored.
    """

    suffix: str = "\n="
    yes: str = "1"
    no: str | None = "0"


class Generator:
    """Jitted, bucketed generation and scoring for one model (compiled programs cached per shape)."""

    def __init__(self, model: Any, *, pad_id: int = 0, min_prompt_bucket: int = 16,
                 min_batch_bucket: int = 1):
        self.model = model
        self.pad_id = int(pad_id)
        self.min_prompt_bucket = int(min_prompt_bucket)
        self.min_batch_bucket = int(min_batch_bucket)
        self.num_traces = 0  # Python side effect in the traced bodies: counts (re)compilations
        self._gen = jax.jit(self._generate_core,
                            static_argnames=("num_samples", "max_new_tokens"))
        self._score = jax.jit(self._next_token_logp_core)

    # ---- traced bodies -----------------------------------------------------------------------

    def _generate_core(self, params, prompt_BxP, lengths_B, row_ids_B, key, temperature, top_p, greedy,
                       stop_S, top_k=0, *, num_samples: int, max_new_tokens: int):
        self.num_traces += 1
        chex.assert_rank(prompt_BxP, 2)
        B, P = prompt_BxP.shape
        n, M = num_samples, max_new_tokens
        model = self.model
        cache = model.init_cache(B, P + M)
        positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32)[None], (B, P))
        logits, cache = model.decode(params, prompt_BxP, cache, positions=positions)
        last = jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
        # Share the prompt KV among the n samples of each prompt: repeat rows (i -> i n .. i n + n - 1).
        rep = lambda x: jnp.repeat(x, n, axis=0)
        cache = model.repeat_cache_rows(cache, n)
        last, lengths = rep(last), rep(lengths_B)
        rows = rep(row_ids_B) * n + jnp.tile(jnp.arange(n, dtype=jnp.int32), B)
        R = B * n
        stop = stop_S  # padded with -1, which no token equals

        def cond(state):
            t, *_, done = state
            return (t < M) & ~jnp.all(done)

        def body(state):
            t, cur, cache, toks, logps, slogps, done = state
            tok, lp = sample_next(cur, row_keys(key, rows, t), temperature, top_p, greedy, top_k)
            tok = jnp.where(done, self.pad_id, tok)
            lp = jnp.where(done, 0.0, lp)
            slp = jnp.take_along_axis(jax.nn.log_softmax(cur.astype(jnp.float32) / temperature, axis=-1),
                                      tok[:, None], axis=-1)[:, 0]
            toks = toks.at[:, t].set(tok)
            logps = logps.at[:, t].set(lp)
            slogps = slogps.at[:, t].set(jnp.where(done, 0.0, slp))
            new_done = done | jnp.any(tok[:, None] == stop[None], axis=-1)
            # Done rows still run (fixed shapes); their writes land in slots nobody reads.
            logits, cache = model.decode(params, tok[:, None], cache, positions=(lengths + t)[:, None])
            return t + 1, logits[:, 0], cache, toks, logps, slogps, new_done

        init = (jnp.int32(0), last, cache, jnp.full((R, M), self.pad_id, jnp.int32),
                jnp.zeros((R, M), jnp.float32), jnp.zeros((R, M), jnp.float32), jnp.zeros((R,), bool))
        t, _, _, toks, logps, slogps, done = jax.lax.while_loop(cond, body, init)
        is_stop = jnp.any(toks[..., None] == stop[None, None], axis=-1) & (jnp.arange(M)[None] < t)
        first_stop = jnp.argmax(is_stop, axis=-1)
        gen_len = jnp.where(done, first_stop + 1, t)
        return toks, logps, gen_len, done, slogps

    def _next_token_logp_core(self, params, ids_BxT, lengths_B):
        self.num_traces += 1
        logits = self.model.apply(params, ids_BxT)
        last = jnp.take_along_axis(logits, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
        return jax.nn.log_softmax(last.astype(jnp.float32), axis=-1)

    # ---- host API ----------------------------------------------------------------------------

    def _pad(self, seqs: Sequence[Sequence[int]], extra: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
        if not seqs:
            raise ValueError("Generator: empty list of prompts")
        lens = np.array([len(s) for s in seqs], np.int32)
        if lens.min() < 1:
            raise ValueError(f"Generator: prompt {int(np.argmin(lens))} is empty (need >= 1 token)")
        P = bucket(int(lens.max()), self.min_prompt_bucket)
        B = bucket(len(seqs), self.min_batch_bucket)
        ids = np.full((B, P), self.pad_id, np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        full_lens = np.ones((B,), np.int32)
        full_lens[: len(seqs)] = lens
        return ids, full_lens, P

    def generate(self, params: Any, prompts: Sequence[Sequence[int]], key: Array, *, num_samples: int = 1,
                 max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 stop_tokens: Sequence[int] = (), top_k: int = 0) -> Generation:
        """Samples ``num_samples`` continuations of every prompt (see the module docstring)."""
        if temperature <= 0 and not greedy:
            raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy=True for argmax")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        ids, lens, _ = self._pad(prompts)
        B = ids.shape[0]
        row_ids = np.arange(B, dtype=np.int32)
        # Stop ids are data, padded to a bucket of 4, so changing them does not recompile either.
        stop = np.full((bucket(len(stop_tokens), 4),), -1, np.int32)
        stop[: len(stop_tokens)] = [int(t) for t in stop_tokens]
        toks, logps, gen_len, done, slogps = self._gen(
            params, jnp.asarray(ids), jnp.asarray(lens), jnp.asarray(row_ids), key,
            jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p), jnp.bool_(greedy),
            jnp.asarray(stop), jnp.int32(top_k), num_samples=int(num_samples),
            max_new_tokens=int(max_new_tokens))
        N, n = len(prompts), int(num_samples)
        shape = (B, n, int(max_new_tokens))
        toks, logps = np.asarray(toks).reshape(shape)[:N], np.asarray(logps).reshape(shape)[:N]
        lengths, stopped = np.asarray(gen_len).reshape(B, n)[:N], np.asarray(done).reshape(B, n)[:N]
        return Generation(toks, logps, lengths, stopped, np.asarray(slogps).reshape(shape)[:N])

    def next_token_logprobs(self, params: Any, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """[N, V] fp32 log-probs of the token following each sequence (one padded forward pass)."""
        ids, lens, _ = self._pad(seqs)
        out = self._score(params, jnp.asarray(ids), jnp.asarray(lens))
        return np.asarray(out)[: len(seqs)]

    def self_evaluate(self, params: Any, eval_prompts: Sequence[Sequence[int]], yes_id: int,
                      no_id: int | None = None) -> np.ndarray:
        """``P(correct)`` per evaluation prompt: ``P(yes) / (P(yes) + P(no))`` (or ``P(yes)``), in [0, 1]."""
        lp = self.next_token_logprobs(params, eval_prompts)
        if no_id is None:
            return np.exp(lp[:, yes_id])
        both = lp[:, [yes_id, no_id]].astype(np.float64)
        return np.exp(both[:, 0] - np.logaddexp(both[:, 0], both[:, 1]))

