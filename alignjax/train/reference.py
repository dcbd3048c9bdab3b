"""Reference handling: frozen copy, reference-free, on-disk cache, EMA / TR-DPO synchronisation.

``config.reference.kind``:

* ``frozen`` - a copy of the initial policy params (or the HF model at ``config.reference.path``:
  ``alignjax.train.loop.reference_from_path``),
  sharded like the policy, never differentiated; with LoRA the policy's own base weights, adapters
  off (:func:`keeps_copy`: no copy);
* ``none``   - reference-free: the step runs no reference forward (a loss that needs ``ref_*``
  inputs is refused at start-up);
* ``cache``  - the reference log-probs of every training batch are computed once, written under
  ``<cache_dir>/<key>/`` (per process, in chunks, each written atomically, so an interrupted build
  resumes; a chunk counts as built only when every process has its file, so all processes skip or
  compute the same chunks together) and then read into the batch as ``ref_chosen_logps`` /
  ``ref_rejected_logps``; ``key`` is a content hash of the model config, a params fingerprint and
  the data settings, so a changed model or dataset never reads a stale cache;
* ``ema``    - TR-DPO: every ``sync_every`` steps ``ref <- alpha * policy + (1 - alpha) * ref``
  ("Learn Your Reference Model for Real Good Alignment", arXiv:2404.09656; alpha = 1 is the hard
  update), done inside the jitted step (:func:`ema_update`).

This module owns the reference: what the state holds (:func:`keeps_copy`, :func:`stored_reference`),
the EMA update the step applies, and the cache (:func:`build_cache`); the step only runs the
reference forward on what it is given.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from alignjax import logprobs, sharding, storage
from alignjax.losses import providers
from alignjax.models import lora
from alignjax.train.checkpoint import fingerprint

__all__ = [
    "CACHEABLE",
    "KINDS",
    "build_cache",
    "keeps_copy",
    "step_reference_mode",
    "cache_key",
    "ReferenceCache",
    "all_processes",
    "ema_update",
    "local_rows",
    "stored_reference",
]

KINDS = ("frozen", "none", "cache", "ema")
CHUNK = 64  # micro-batches per cache file
# Reference values a precomputed cache can supply (per-sequence sums only).
CACHEABLE = tuple(n for n, p in providers.PROVIDERS.items() if p.cacheable)


def step_reference_mode(kind: str) -> str:
    """config.reference.kind -> what the step does: "model" (forward), "batch" (cached) or "none"."""
    if kind not in KINDS:
        raise ValueError(f"config.reference.kind={kind!r}; choose one of {list(KINDS)}")
    return {"frozen": "model", "ema": "model", "cache": "batch", "none": "none"}[kind]


def keeps_copy(kind: str, model: Any) -> bool:
    """Whether the train state holds reference params for ``config.reference.kind``.

    A frozen reference is a copy of the initial policy, except with LoRA adapters
    (``config.model.lora.rank > 0``): the reference is then the policy's own frozen base with the
    adapters removed (:func:`alignjax.models.lora.reference_params`), so the state holds no second
    copy of the weights and the step's reference forward reads the same buffers as the policy's.
    An EMA reference averages the whole policy into a copy, which LoRA's split does not support.
    """
    if kind == "ema" and lora.model_lora(model) is not None:
        raise ValueError(
            "config.reference.kind='ema' with config.model.lora.rank > 0 is not supported (LoRA's "
            "reference is the frozen base itself): use kind='frozen' or 'cache'"
        )
    return step_reference_mode(kind) == "model" and lora.model_lora(model) is None


def cache_key(model_config: Any, params_fingerprint: list[float], data_settings: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex) of the model config, params fingerprint and data/tokenization settings."""
    cfg = dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else dict(model_config)
    blob = json.dumps(
        {"model": cfg, "params": params_fingerprint, "data": dict(data_settings)}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order (replicas dropped)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        shards.setdefault(start, np.asarray(shard.data))
    return np.concatenate([shards[k] for k in sorted(shards)], axis=0)


def all_processes(flags: Sequence[bool]) -> np.ndarray:
    """``flags`` AND-ed entry by entry over all processes: True where every process passed True.

    A collective: every process calls it with the same number of flags. It turns per-process
    observations (which files this host sees) into one decision all hosts act on, so no host skips
    a computation whose collectives another host runs.
    """
    local = np.asarray(flags, dtype=np.int32).reshape(-1)
    if jax.process_count() == 1 or local.size == 0:
        return local.astype(bool)
    return np.asarray(multihost_utils.process_allgather(local)).min(axis=0).astype(bool)


class ReferenceCache:
    """Per-process files ``p<process>_c<chunk>.npz`` holding ``[chunk, b_local]`` arrays per name.

    Micro-batch ``i`` (counted over the whole run, ``step * k + j``) lives in chunk ``i // chunk``.
    ``complete`` and ``build`` are collectives (every process calls them): a chunk is built when
    every process has its file, else every process computes it again.
    """

    def __init__(self, directory: storage.PathLike, key: str, names: tuple[str, ...], chunk: int = CHUNK):
        self.directory = storage.path(directory) / key  # local or an object store
        self.names = tuple(n for n in names if n in CACHEABLE)
        self.process = jax.process_index()
        self.chunk = chunk
        self._loaded: dict[int, dict[str, np.ndarray]] = {}

    def _path(self, chunk: int) -> epath.Path:
        return self.directory / f"p{self.process}_c{chunk:06d}.npz"

    def built_chunks(self, num_micro: int) -> np.ndarray:
        """[num_chunks] bool: chunk c is built on every process (a collective)."""
        return all_processes([self._path(c).exists() for c in range(-(-num_micro // self.chunk))])

    def complete(self, num_micro: int) -> bool:
        return bool(self.built_chunks(num_micro).all())

    def build(
        self,
        batches: Iterator[Mapping[str, np.ndarray]],
        num_micro: int,
        compute: Callable[[Mapping[str, np.ndarray]], dict[str, jax.Array]],
        progress: bool = False,
    ) -> int:
        """Computes and writes every chunk that some process lacks (on every process, each writing
        its own file); returns the number of chunks written.

        ``batches`` yields host-local micro-batches in training order; ``compute`` maps one to
        global per-example arrays ``{name: [B]}`` (batch-sharded).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        written = 0
        built = self.built_chunks(num_micro)
        for chunk, done in enumerate(built):
            count = min(self.chunk, num_micro - chunk * self.chunk)
            if done:
                for _ in range(count):  # already built: advance the iterator past it
                    next(batches)
                continue
            rows: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
            for _ in range(count):
                out = compute(next(batches))
                for n in self.names:
                    rows[n].append(local_rows(out[n]))
            npz = io.BytesIO()
            np.savez(npz, **{n: np.stack(v) for n, v in rows.items()})
            storage.write_bytes(self._path(chunk), npz.getvalue())  # a chunk file is whole or absent
            written += 1
        return written

    def lookup(self, micro_index: int) -> dict[str, np.ndarray]:
        chunk, offset = divmod(micro_index, self.chunk)
        if chunk not in self._loaded:
            self._loaded = {chunk: dict(np.load(io.BytesIO(self._path(chunk).read_bytes())))}
        return {n: self._loaded[chunk][n][offset] for n in self.names}


def ema_update(ref_params: Any, params: Any, alpha: float | jax.Array) -> Any:
    """TR-DPO soft update ``ref <- alpha * policy + (1 - alpha) * ref`` (alpha = 1: hard sync).

    "Learn Your Reference Model for Real Good Alignment" (Gorbatovski et al., arXiv:2404.09656).
    """
    return jax.tree.map(
        lambda r, p: (alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)).astype(r.dtype),
        ref_params,
        params,
    )


def stored_reference(params: Any, dtype: Any = None) -> Any:
    """The reference params the train state holds: ``params`` in new buffers (so donating the
    policy's buffers to the step leaves the reference intact), leaves wider than ``dtype`` cast to it.

    A frozen reference is stored in the model's compute dtype: the forward casts every weight to that
    dtype before use (``Proj``, ``RMSNorm``, the embedding and the unembedding), so its log-probs are
    bitwise those of the param-dtype copy, while the state is half the size and the step no longer
    reads fp32 weights to write bf16 copies of them on every call. An EMA (TR-DPO) reference stays in
    the param dtype (``dtype=None``): its update adds small steps that bf16 would round away.
    """

    def store(x: jax.Array) -> jax.Array:
        if dtype is None or jnp.dtype(dtype).itemsize >= x.dtype.itemsize:
            return x.copy()  # an explicit copy: jit forwards an unchanged input buffer to its output
        return x.astype(dtype)

    return jax.tree.map(store, params)


def build_cache(
    config: Any,
    workdir: str,
    model: Any,
    spec: Any,
    ref_params: Any,
    num_micro: int,
    batches: Callable[[], Iterator[Mapping[str, np.ndarray]]],
) -> ReferenceCache:
    """Precomputes the reference log-probs of every training micro-batch (resumable): ``batches()``
    yields the run's host micro-batches in training order, sequence ids global."""
    mesh = model.mesh
    settings = {k: config.data[k] for k in ("source", "tokenizer", "kind", "layout", "max_length")}
    # truncation changes the sequences (and so their log-probs) without changing the source
    truncation = ("max_prompt_length", "max_completion_length", "truncation_mode")
    settings.update({k: config.data.get(k) for k in truncation})
    settings.update(
        micro_batch=spec.batch_size, seed=config.seed, processes=jax.process_count(), num_micro=num_micro
    )
    key = cache_key(model.config, fingerprint(ref_params), settings)
    directory = config.reference.cache_dir or storage.path(workdir) / "ref_cache"
    cache = ReferenceCache(directory, key, spec.required)
    if cache.complete(num_micro):
        return cache
    n, b = spec.num_sequences, spec.batch_size
    out_sharding = sharding.batch_sharding(mesh, 1)

    @functools.partial(jax.jit, compiler_options=logprobs.strict_rounding(model.config.dtype))
    def compute(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        # the train step's own log-prob path, so that equal params give its log-probs bitwise
        seq, _ = logprobs.batch_sequence_logps(model, params, batch, n, **spec.logprob_options)
        seq = jax.lax.with_sharding_constraint(seq, out_sharding)
        first = jax.lax.with_sharding_constraint(seq[:b], out_sharding)
        second = jax.lax.with_sharding_constraint(seq[b : 2 * b] if n > b else seq[:0], out_sharding)
        return {
            "ref_chosen_logps": first,
            "ref_rejected_logps": second,
            "ref_logps": first,
            "ref_kl_logps": second,
        }

    cache.build(batches(), num_micro, lambda h: compute(ref_params, sharding.global_batch(mesh, h)))
    return cache
