"""Deterministic, shuffled, checkpointable, process-sharded preference batches.

The iterator's whole state is ``{"epoch", "position"}`` (``position`` = batches already produced in
this epoch): epoch ``e`` visits the kept examples in the order ``default_rng([seed, e]).permutation``;
step ``s`` takes the global slice ``[s*G, (s+1)*G)`` of it (``G = batch_size``, the *global* number of
examples per step) and process ``p`` of ``P`` keeps the ``p``-th contiguous ``G/P`` of that slice, so
the processes see disjoint shards whose union is the epoch (the remainder ``N mod G`` is dropped,
different each epoch). Restoring the state resumes exactly. (grain's index sampler would do the
same with its own state; these two integers are what checkpoints and resume tests already hold.)

Examples are columns (:mod:`alignjax.data.store`: int32 tokens and offsets), tokenized in batches
(``encode_batch``, the ``tokenizers`` library's threads). A JSONL/Parquet source or an ``hf:``
dataset saved with ``save_to_disk``, with a ``cache_dir``, goes through the tokenized on-disk cache
(:mod:`alignjax.data.cache`): process ``p`` reads and tokenizes only its part of the rows once,
every process then maps all parts, and skip decisions, counts, the held-out split and the
permutation come from the cache's metadata, the same on every process. Other sources (Hub ``hf:``
names, TFDS, SeqIO, in-memory records) are read and tokenized by every process. Only its own shard
of each step is laid out into batches;
``alignjax.sharding.global_batch(mesh, host_batch)`` then assembles them into global arrays.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from alignjax import storage
from alignjax.data import batching, cache, readers, schema, synthetic
from alignjax.data.schema import DataError, DataStats
from alignjax.data.store import ColumnWriter, ExamplesView, Store
from alignjax.data.tokenize import ChatTokenizer, TokenizedExample, tokenize_rows


def resolve_tokenizer(tokenizer: Any) -> ChatTokenizer:
    """A ChatTokenizer, a tokenizer directory, or a built-in name (``"arithmetic"``/``"multistep"``)."""
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer
    if isinstance(tokenizer, str):
        if tokenizer in synthetic.TOKENIZERS:
            return synthetic.TOKENIZERS[tokenizer]()
        return ChatTokenizer.from_pretrained(tokenizer)
    raise TypeError(
        f"tokenizer must be a ChatTokenizer, a directory or a built-in name, got {type(tokenizer).__name__}"
    )


def resolve_source(source: Any) -> Any:
    """``"synthetic:<task>[:<split>]"`` names a built-in task (``synthetic.records``); else passes through."""
    if isinstance(source, str) and source.startswith("synthetic:"):
        parts = source.split(":")
        return synthetic.records(parts[1], parts[2] if len(parts) > 2 else "train")
    return source


SPLITS = ("all", "train", "eval")


def is_synthetic(source: Any) -> bool:
    return isinstance(source, str) and source.startswith("synthetic:")


def holdout_mask(n: int, fraction: float, split: str) -> np.ndarray:
    """Which of ``n`` records ``split`` keeps (see :func:`holdout_split`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if split == "all":
        return np.ones(n, bool)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in (0, 1) to hold out rows, got {fraction}")
    held = np.zeros(n, bool)
    held[np.random.default_rng(0).permutation(n)[: max(1, round(fraction * n))]] = True
    return held if split == "eval" else ~held


def holdout_split(records: Sequence[Any], fraction: float, split: str) -> list[Any]:
    """``split`` of ``records``: ``"all"``; ``"eval"``, a ``fraction`` of them chosen by a fixed
    permutation (the same rows whatever the run's seed); ``"train"``, the rest (disjoint)."""
    keep = holdout_mask(len(records), fraction, split)
    return [r for r, k in zip(records, keep) if k]


def eval_plan(source: Any, eval_source: Any, eval_fraction: float) -> tuple[Any, str] | None:
    """Where evaluation reads: ``(eval_source, "all")``, or ``(source, "eval")`` (a held-out
    ``eval_fraction`` of the training data), or None. A built-in ``synthetic:`` eval set only goes
    with a synthetic training source: a user's data is never evaluated on the arithmetic pairs."""
    if eval_source and (is_synthetic(source) or not is_synthetic(eval_source)):
        return eval_source, "all"
    if eval_fraction:
        return source, "eval"
    return None


def tokenize_options(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """Tokenization and truncation keyword arguments from ``config.data`` (``0`` = unset)."""
    get = data_config.get
    return dict(
        tokenization=get("tokenization", "trl"),
        max_prompt_length=get("max_prompt_length", 0) or None,
        max_completion_length=get("max_completion_length", 0) or None,
        truncation_mode=get("truncation_mode", "keep_start"),
    )


CHUNK = 512  # records per batched tokenizer call


def iter_tokenized(
    records: Iterable[tuple[str, Mapping[str, Any]]],
    tokenizer: ChatTokenizer,
    *,
    on_bad_row: str,
    stats: DataStats,
    **options: Any,
) -> Iterator[tuple[TokenizedExample, Mapping[str, Any]]]:
    """``(example, record)`` of every ``(where, record)`` that tokenizes (options as
    :func:`~alignjax.data.tokenize.tokenize_record`), ``CHUNK`` records per batched
    ``encode_batch``; a bad row raises (``on_bad_row="error"``) or is counted in ``stats`` and skipped
    (a pair made identical by truncation is always skipped)."""
    it = iter(records)
    while chunk := list(itertools.islice(it, CHUNK)):
        rows = tokenize_rows([r for _, r in chunk], [w for w, _ in chunk], tokenizer, **options)
        for (_, rec), row in zip(chunk, rows):
            row.add_to(stats)
            if isinstance(row.result, DataError):
                if on_bad_row == "error" and row.result.reason not in schema.ALWAYS_SKIP:
                    raise row.result
                stats.skip(row.result)
                continue
            yield row.result, rec


def tokenize_all(
    records: Iterable[tuple[str, Mapping[str, Any]]],
    tokenizer: ChatTokenizer,
    *,
    on_bad_row: str,
    stats: DataStats,
    tokenization: str = "trl",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> tuple[list[TokenizedExample], list[Mapping[str, Any]]]:
    """``(examples, kept records)`` of :func:`iter_tokenized`; ``stats.rows_kept`` is set."""
    out, kept = [], []
    for ex, rec in iter_tokenized(
        records,
        tokenizer,
        on_bad_row=on_bad_row,
        stats=stats,
        tokenization=tokenization,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        truncation_mode=truncation_mode,
    ):
        out.append(ex)
        kept.append(rec)
    stats.rows_kept = len(out)
    return out, kept


def map_rows(
    records: Iterable[tuple[str, Mapping[str, Any]]],
    fn: Callable[[str, Mapping[str, Any]], Any],
    *,
    on_bad_row: str,
    stats: DataStats,
) -> tuple[list[Any], list[Mapping[str, Any]]]:
    """``(outputs, kept records)`` of ``fn(where, record)`` over ``records``: a row whose ``fn``
    raises DataError raises (``on_bad_row="error"``) or is counted in ``stats`` and skipped;
    ``stats.rows_kept`` is set."""
    out, kept = [], []
    for where, rec in records:
        try:
            out.append(fn(where, rec))
        except DataError as e:
            if on_bad_row == "error" and e.reason not in schema.ALWAYS_SKIP:
                raise
            stats.skip(e)
            continue
        kept.append(rec)
    stats.rows_kept = len(out)
    return out, kept


def resolve_cache_dir(cache_dir: str, workdir: Any = None) -> str | None:
    """``config.data.cache_dir``: a directory (local or gs://, may be shared by runs); ``""`` =
    ``<workdir>/data_cache`` (none without a workdir); ``"off"`` = no cache."""
    if cache_dir == "off":
        return None
    if cache_dir:
        return cache_dir
    return None if workdir is None else os.fspath(storage.path(workdir) / "data_cache")


class TooFewExamples(ValueError):
    """Fewer usable examples than one batch (``count`` < ``batch_size``)."""

    def __init__(self, count: int, batch_size: int, skipped: Mapping[str, int]):
        self.count, self.batch_size = count, batch_size
        super().__init__(
            f"only {count} usable examples, fewer than one batch of {batch_size} (skipped: {skipped})"
        )


class PreferenceData:
    """Iterator of host-local batches (see :mod:`alignjax.data.batching` for the layout).

    ``split``/``eval_fraction`` select rows of ``source`` (:func:`holdout_split`); the tokenization
    and truncation options are :func:`~alignjax.data.tokenize.tokenize_record`'s. With ``cache_dir``
    a JSONL/Parquet source goes through the tokenized on-disk cache (:mod:`alignjax.data.cache`):
    built once, split across the processes, then memory-mapped; other sources are tokenized in memory.
    ``get_state()``/``set_state()`` checkpoint it; ``stats`` holds read/skip/truncation/padding counts.
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Any,
        *,
        kind: str = "pairwise",
        layout: str = "padded",
        batch_size: int = 8,
        tokenization: str = "trl",
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        truncation_mode: str = "keep_start",
        rationale_template: str | None = None,
        degree_removals: int | None = None,
        pad_to_multiple_of: int | None = None,
        buckets: Sequence[int] | None = None,
        pack_length: int | None = None,
        pack_rows: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        on_bad_row: str = "error",
        split: str = "all",
        eval_fraction: float = 0.0,
        process_index: int | None = None,
        process_count: int | None = None,
        cache_dir: str | None = None,
    ):
        schema.check_on_bad_row(on_bad_row)
        if layout not in batching.LAYOUTS:
            raise ValueError(
                f"unknown layout {layout!r} (config key data.layout); valid: {list(batching.LAYOUTS)}"
            )
        if layout == "shared_prompt" and kind not in ("pairwise", "step"):
            raise ValueError(f"layout 'shared_prompt' needs pairs, but kind={kind!r}")
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} (global) must be divisible by the {process_count} processes"
            )
        self.tokenizer = resolve_tokenizer(tokenizer)
        self.kind, self.layout, self.batch_size = kind, layout, batch_size
        self.host_batch_size = batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.layout_kwargs = dict(
            pad_id=self.tokenizer.pad_id,
            max_length=max_length,
            buckets=buckets,
            pack_length=pack_length,
            pack_rows=pack_rows,
            pad_to_multiple_of=pad_to_multiple_of,
        )
        self.stats = DataStats()
        options = dict(
            tokenization=tokenization,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            max_completion_length=max_completion_length,
            truncation_mode=truncation_mode,
        )
        if rationale_template is not None:
            if layout == "shared_prompt":
                raise ValueError(
                    "rationale sequences need data.layout 'padded' or 'packed', not 'shared_prompt'"
                )
            options["rationale_template"] = rationale_template
        if degree_removals is not None:
            if layout == "shared_prompt":
                raise ValueError(
                    "degraded responses need data.layout 'padded' or 'packed', not 'shared_prompt'"
                )
            options["degree_removals"] = int(degree_removals)
        source = resolve_source(source)
        if cache_dir is not None and readers.is_shardable(source):
            self.examples = self._from_cache(
                os.fspath(source), cache_dir, kind, on_bad_row, options, split, eval_fraction
            )
        else:
            records = readers.load_records(source, kind, on_bad_row, self.stats)
            records = holdout_split(records, eval_fraction, split)
            writer, wheres = ColumnWriter(), []
            for ex, _ in iter_tokenized(
                records, self.tokenizer, on_bad_row=on_bad_row, stats=self.stats, **options
            ):
                writer.add(ex)
                wheres.append(ex.where)
            self.stats.rows_kept = len(wheres)
            store = Store(writer.finish(), wheres.__getitem__)
            self.examples = ExamplesView(store, np.arange(len(store)))
        self.steps_per_epoch = len(self.examples) // batch_size
        if self.steps_per_epoch == 0:
            raise TooFewExamples(len(self.examples), batch_size, dict(self.stats.skipped))
        self.epoch, self.position = 0, 0

    def _from_cache(
        self,
        source: str,
        cache_dir: str,
        kind: str,
        on_bad_row: str,
        options: Mapping[str, Any],
        split: str,
        eval_fraction: float,
    ) -> ExamplesView:
        """The examples of ``split`` from the tokenized cache (built first if needed), with the
        statistics the in-memory path would have counted for them."""
        cached = cache.load(
            source,
            self.tokenizer,
            cache_dir,
            kind=kind,
            on_bad_row=on_bad_row,
            options=options,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        stats = self.stats
        stats.rows_read = cached.rows_read
        if stats.rows_read == 0:
            raise DataError(source, schema.REASON_EMPTY, "the file has no data rows")
        stats.skipped.update(cached.validation_skips)
        stats.examples.extend(cached.validation_messages)
        keep = holdout_mask(len(cached.rec_example), eval_fraction, split)
        for rec, err in cached.tokenization_skips:
            if keep[rec]:
                stats.skip(err)
        stats.truncated_prompts, stats.truncated_completions, stats.boundary_shifts = (
            int(v) for v in cached.rec_deltas[keep].sum(axis=0)
        )
        stats.duplicates = cached.duplicates
        index = cached.rec_example[keep]
        index = index[index >= 0]
        stats.rows_kept = len(index)
        return ExamplesView(cached.store, index)

    # ---- checkpointable state ----
    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # ---- iteration ----
    def epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def host_indices(self, epoch: int, position: int) -> np.ndarray:
        """Indices (into ``examples``) of this process's share of global step ``position`` of ``epoch``."""
        start = position * self.batch_size + self.process_index * self.host_batch_size
        return self.epoch_order(epoch)[start : start + self.host_batch_size]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        idx = self.host_indices(self.epoch, self.position)
        self.position += 1
        examples = [self.examples[i] for i in idx]
        if self.kind == "unpaired":
            examples = batching.with_kl_completions(examples, self.layout_kwargs["max_length"])
        batch = batching.make_batch(examples, self.layout, stats=self.stats, **self.layout_kwargs)
        if self.kind == "unpaired":  # the lengths of the examples' own completions only
            batch["lengths"] = batch.pop("chosen_lengths")
            del batch["rejected_lengths"]
        return batch


def make_preference_batches(source: Any, tokenizer: Any, **options: Any) -> tuple[PreferenceData, DataStats]:
    """One call from config-like arguments to ``(iterator of host-local batches, stats)``.

    ``batch_size`` is global (examples per step over all processes); each process gets
    ``batch_size // process_count``. ``options`` are :class:`PreferenceData`'s keyword arguments.
    """
    data = PreferenceData(source, tokenizer, **options)
    return data, data.stats
