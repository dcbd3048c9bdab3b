"""Readers: JSONL, Parquet, Hugging Face ``datasets``, TFDS and SeqIO sources to validated records.

Each reader yields ``(where, raw_row)`` with ``where = "<file>:<line>"`` (1-based; for Parquet the
row number, for TFDS/SeqIO ``"tfds:<name>/<split>:<record>"``, for ``datasets``
``"hf:<name>[<split>]:row <index>"`` with the dataset's own 0-based index). :func:`load_records`
validates them (see :mod:`alignjax.data.schema`). TensorFlow, TFDS, SeqIO and ``datasets`` are
imported inside the functions that need them: TensorFlow costs about 8 s of start-up; they are the
``[tfds]`` and ``[hf]`` extras.

A source is one of:

* a path ending in ``.jsonl`` / ``.json`` (one JSON object per line) or ``.parquet``;
* ``"hf:<dataset>[:<split>]"``: a Hugging Face dataset, TRL's columns (:func:`read_hf`);
* a list of dicts (in memory; ``where = "<records>:<i>"``, 1-based);
* ``{"type": "tfds", "name": "my_prefs:1.0.0", "split": "train", "data_dir": ...}``;
* ``{"type": "seqio", "task": "my_task", "split": "train"}`` (see :func:`register_seqio_task`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from alignjax import storage
from alignjax.data import schema
from alignjax.data.schema import REASON_INVALID_UTF8, DataError, DataStats


def _jsonl_row(raw: bytes, where: str) -> Any:
    """A parsed JSONL line, None for a blank one, or the DataError of a bad one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return DataError(where, REASON_INVALID_UTF8, f"invalid UTF-8 at byte {err.start}")
    if not line.strip():
        return None
    try:
        return schema.parse_json_line(line, where)
    except DataError as e:
        return e


def read_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    """Yields ``("path:line", row)``; blank lines are ignored, unparsable lines (invalid UTF-8
    included) yield a DataError. ``path`` may be local or on an object store (gs://)."""
    with storage.path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            row = _jsonl_row(raw, where)
            if row is not None:
                yield where, row


def _line_start(f: Any, offset: int, size: int) -> int:
    """The first line start at or after byte ``offset``."""
    if offset <= 0 or offset >= size:
        return min(max(offset, 0), size)
    f.seek(offset - 1)
    return offset - 1 + len(f.readline())


def share_bounds(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """``[lo, hi)`` of the ``shard``-th of ``num_shards`` contiguous, near-equal parts of ``n``."""
    return n * shard // num_shards, n * (shard + 1) // num_shards


def jsonl_share(path: str, shard: int, num_shards: int) -> Iterator[tuple[int, Any]]:
    """``(line, row)`` of the lines starting in byte range ``shard`` of ``num_shards`` (numbered
    from 1 within the range; ``row`` None for a blank line, else as :func:`read_jsonl` yields it).
    Only that range is read."""
    p = storage.path(path)
    size = p.stat().length
    with p.open("rb") as f:
        lo, hi = (_line_start(f, b, size) for b in share_bounds(size, shard, num_shards))
        f.seek(lo)
        pos, lineno = lo, 0
        while pos < hi:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            lineno += 1
            yield lineno, _jsonl_row(raw, str(lineno))


def read_parquet(path: str) -> Iterator[tuple[str, Any]]:
    """Yields ``("path:row", row)`` with rows numbered from 1; nested lists/structs become lists/dicts."""
    for i, row in parquet_share(path, 0, 1):
        yield f"{path}:{i}", row


def parquet_share(path: str, shard: int, num_shards: int) -> Iterator[tuple[int, Any]]:
    """``(row, row dict)`` of the ``shard``-th of ``num_shards`` contiguous row ranges (numbered from 1
    within the range); only the row groups overlapping it are read, 1024 rows at a time."""
    import pyarrow.parquet as pq

    with storage.path(path).open("rb") as f:
        pf = pq.ParquetFile(f)
        lo, hi = share_bounds(pf.metadata.num_rows, shard, num_shards)
        start, local = 0, 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if start < hi and start + n > lo:
                table = pf.read_row_group(g)
                a = max(lo - start, 0)
                table = table.slice(a, min(hi - start, n) - a)
                for batch in table.to_batches(max_chunksize=1024):
                    for row in batch.to_pylist():
                        local += 1
                        yield local, {k: v for k, v in row.items() if v is not None}
            start += n


# Files save_to_disk writes: a Dataset (state.json, dataset_info.json) or a DatasetDict (dataset_dict.json).
_SAVED_DATASET_FILES = ("dataset_dict.json", "state.json", "dataset_info.json")


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """``"hf:<dataset>[:<split>]"`` -> ``(dataset, split or None)``; a dataset name may contain ``/``."""
    body = source.removeprefix("hf:")
    name, sep, split = body.rpartition(":")
    if not sep or not name or "/" in split:
        return body, None
    return name, split


def read_hf(source: str) -> Iterator[tuple[str, Any]]:
    """Yields ``("hf:<name>[<split>]:row <i>", row)`` of a Hugging Face dataset, in stored order.

    A directory written by ``save_to_disk`` is read with ``datasets.load_from_disk`` (a DatasetDict
    gives ``split``, default ``train``); anything else (a Hub name, a directory of data files, a
    builder such as ``json``) with ``datasets.load_dataset(name, split=split or "train")``, which
    works offline on local data. Columns are TRL's: ``prompt``/``chosen``/``rejected`` (strings or
    lists of ``{role, content}``; without ``prompt`` the shared conversation prefix), or
    ``prompt``/``completion``/``label``. ``None`` cells (columns a row lacks) are dropped.
    """
    ds = _hf_dataset(source)
    for i, row in enumerate(ds):
        yield row_where(source, i + 1), _hf_row(row)


def _hf_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if v is not None}


def _hf_dataset(source: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "data.source hf:... needs the datasets package (pip install 'alignjax[hf]')"
        ) from None
    name, split = parse_hf_source(source)
    if is_saved_dataset(source):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            split = split or "train"
            if split not in ds:
                raise ValueError(f"data source {source!r}: no split {split!r} (has {sorted(ds)})")
            ds = ds[split]
        elif split not in (None, "train"):
            raise ValueError(f"data source {source!r}: {name} holds one Dataset, not a split {split!r}")
        return ds
    return datasets.load_dataset(name, split=split or "train")


def is_saved_dataset(source: Any) -> bool:
    """``hf:<dir>`` of a dataset written by ``save_to_disk``."""
    if not (isinstance(source, str) and source.startswith("hf:")):
        return False
    name, _ = parse_hf_source(source)
    return os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in _SAVED_DATASET_FILES)


def hf_share(source: str, shard: int, num_shards: int) -> Iterator[tuple[int, Any]]:
    """``(row, row dict)`` of the ``shard``-th of ``num_shards`` contiguous row ranges of a saved
    dataset (numbered from 1 within the range); its Arrow files are memory-mapped, so only those
    rows are read."""
    ds = _hf_dataset(source)
    lo, hi = share_bounds(len(ds), shard, num_shards)
    for local, row in enumerate(ds.select(range(lo, hi)), 1):
        yield local, _hf_row(row)


def row_where(source: Any, n: int) -> str:
    """Where row ``n`` (from 1) of ``source`` is, as its errors and examples name it: ``path:n`` for
    files, ``hf:<name>[<split>]:row <n - 1>`` for Hugging Face datasets (their own 0-based index)."""
    if isinstance(source, str) and source.startswith("hf:"):
        name, split = parse_hf_source(source)
        return f"hf:{name}[{split or 'train'}]:row {n - 1}"
    return f"{os.fspath(source)}:{n}"


def _from_tf(value: Any) -> Any:
    """TFDS numpy examples to Python: bytes -> str, arrays -> lists, nested dicts of sequences -> lists."""
    import numpy as np

    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind == "S":
            return [_from_tf(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out = {k: _from_tf(v) for k, v in value.items()}
        # A tfds.features.Sequence of dicts arrives as a dict of lists; chat messages want a list of dicts.
        lists = [v for v in out.values() if isinstance(v, list)]
        if out and len(lists) == len(out) and len({len(v) for v in lists}) == 1:
            keys = list(out)
            return [dict(zip(keys, vals)) for vals in zip(*out.values())]
        return out
    return value


def read_tfds(name: str, split: str = "train", data_dir: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yields rows of a TFDS dataset (``tfds.builder(name, data_dir=...)``), in stored order."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    ds = builder.as_dataset(split=split, shuffle_files=False)
    for i, ex in enumerate(tfds.as_numpy(ds), start=1):
        yield f"tfds:{name}/{split}:{i}", _from_tf(ex)


def register_seqio_task(
    task_name: str,
    tfds_name: str,
    tfds_data_dir: str | None = None,
    fields: Sequence[str] = ("prompt", "chosen", "rejected"),
) -> Any:
    """Registers a SeqIO preference task over a TFDS source; returns the ``seqio.Task``.

    The task's output features are the text fields themselves (``PassThroughVocabulary``), so that
    tokenization and chat templates stay in one place (:mod:`alignjax.data.tokenize`) whatever the
    source. Re-registering an existing name replaces it.
    """
    import seqio
    import tensorflow as tf

    if task_name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(task_name)
    vocab = seqio.PassThroughVocabulary(size=0)
    return seqio.TaskRegistry.add(
        task_name,
        source=seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir),
        preprocessors=[],
        output_features={f: seqio.Feature(vocab, add_eos=False, dtype=tf.string, rank=0) for f in fields},
    )


def read_seqio(task: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Yields rows of a registered SeqIO task's split (unshuffled)."""
    import seqio
    import tensorflow_datasets as tfds

    ds = seqio.get_mixture_or_task(task).get_dataset(split=split, shuffle=False, num_epochs=1)
    for i, ex in enumerate(tfds.as_numpy(ds), start=1):
        yield f"seqio:{task}/{split}:{i}", _from_tf(ex)


def iter_source(source: Any) -> Iterator[tuple[str, Any]]:
    """Dispatches a source (path, list of dicts, or a tfds/seqio spec dict) to its reader."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.startswith("hf:"):
            return read_hf(path)
        if path.endswith((".jsonl", ".json")):
            return read_jsonl(path)
        if path.endswith(".parquet"):
            return read_parquet(path)
        raise ValueError(
            f"data source {path!r}: unknown file type (expected .jsonl, .json, .parquet, hf:<dataset> "
            "or synthetic:<task>)"
        )
    if isinstance(source, Mapping):
        kind = source.get("type")
        if kind == "tfds":
            return read_tfds(source["name"], source.get("split", "train"), source.get("data_dir"))
        if kind == "seqio":
            return read_seqio(source["task"], source.get("split", "train"))
        raise ValueError(f"data source dict needs type 'tfds' or 'seqio', got {kind!r}")
    if isinstance(source, Sequence):
        return ((f"<records>:{i}", row) for i, row in enumerate(source, start=1))
    raise TypeError(f"unsupported data source {type(source).__name__}")


def validate_row(raw: Any, kind: str, where: str) -> list[dict[str, Any]]:
    """The validated record(s) of one raw row (a pair read as ``unpaired`` gives two); raises the
    row's DataError (a reader yields unparsable rows as DataErrors)."""
    if isinstance(raw, DataError):
        raise raw
    if kind == "unpaired" and schema.is_pair_row(raw):
        return schema.unpair(schema.validate_record(raw, "pairwise", where))
    return [schema.validate_record(raw, kind, where)]


def is_file_source(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(
        (".jsonl", ".json", ".parquet")
    )


def is_shardable(source: Any) -> bool:
    """Sources each process can read a share of (the tokenized cache's): JSONL and Parquet files,
    ``hf:`` datasets saved with ``save_to_disk``."""
    return is_file_source(source) or is_saved_dataset(source)


def load_records(
    source: Any, kind: str = "pairwise", on_bad_row: str = "error", stats: DataStats | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Reads and validates every row: returns ``[(where, record), ...]``.

    ``on_bad_row="error"`` raises the first DataError (message ``"file:line: problem"``);
    ``"skip"`` counts each bad row by reason in ``stats`` and goes on. Records equal to an earlier
    one are kept and counted (``stats.duplicates``); a file without rows is an error naming it.
    """
    schema.check_on_bad_row(on_bad_row)
    stats = DataStats() if stats is None else stats
    out = []
    seen: set[bytes] = set()
    for where, raw in iter_source(source):
        stats.rows_read += 1
        try:
            records = validate_row(raw, kind, where)
        except DataError as e:
            if on_bad_row == "error":
                raise
            stats.skip(e)
            continue
        for rec in records:
            key = schema.record_key(rec)
            stats.duplicates += key in seen
            seen.add(key)
            out.append((where, rec))
    if stats.rows_read == 0 and is_file_source(source):
        raise DataError(os.fspath(source), schema.REASON_EMPTY, "the file has no data rows")
    return out
