"""The tokenized on-disk cache: a JSONL/Parquet source read, validated and tokenized once, with the
work split across processes, then memory-mapped by every process.

``<cache_dir>/<key>/`` holds one shard per process of the build, ``shard-<p>-of-<P>/``: process
``p`` reads only its contiguous part of the source (a byte range of a JSONL file, the row groups of
a Parquet row range; :mod:`alignjax.data.readers`), tokenizes it in batches and writes
:mod:`alignjax.data.store` columns plus, per validated record, its line, its example (or -1),
its truncation counts and a content digest, and ``meta.json`` (counts, skips, a first error).
A shard is written in a temporary directory and renamed (locally) or uploaded with ``meta.json``
last (object stores), so a shard either is complete or is not there: a build killed halfway leaves
nothing a restart reads. After a barrier every process maps all shards and derives the same
skip decisions, counts, duplicates and splits from their metadata; process 0 then writes
``index.json``, which later starts check (all processes together) and then only read.

``key`` hashes the source's content (memoised per file identity: path, size, mtime), the tokenizer
(its ``tokenizer.json`` serialisation, templates and special tokens), the record kind, the
tokenization and length settings, ``on_bad_row``, the per-example columns a shard stores
(:data:`alignjax.data.store.EXTRA_DTYPES`) and :data:`VERSION`. The batch layout, batch
size, seed, process count and held-out split are not in it: they are applied when reading.
On gs:// the shards are copied to a local directory (``$TMPDIR/alignjax-data-cache``) and mapped
there.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from alignjax import storage
from alignjax.data import readers, schema
from alignjax.data.schema import ALWAYS_SKIP, DataError
from alignjax.data.store import EXTRA_DTYPES, ColumnWriter, Concat, Store
from alignjax.data.tokenize import ChatTokenizer, tokenize_rows

VERSION = 2  # bump when the shard format or anything that changes ids or skip decisions changes
CHUNK = 512  # records per encode_batch call
MAX_MESSAGES = schema.DataStats.max_examples
STALE_TMP_S = 3600  # a temporary shard directory this old is a dead build's


# ------------------------------------------------------------------------------------------ keys


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def _write_atomic(p: Any, text: str) -> None:
    """Whole-file write; locally through a temporary name of its own (several processes may race)."""
    if not storage.is_local(p):
        storage.write_text(p, text)
        return
    tmp = f"{os.fspath(p)}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, p)


def _files_under(root: Any) -> Iterator[Any]:
    for p in root.iterdir():
        if p.is_dir():
            yield from _files_under(p)
        else:
            yield p


def source_fingerprint(source: str, cache_dir: str) -> str:
    """The content hash of a data file, memoised under ``cache_dir/sources`` by its identity (path,
    size, mtime; an object's own checksum on object stores) so that a restart does not re-read it."""
    if source.startswith("hf:"):  # a saved dataset: every file of its directory
        root = storage.path(readers.parse_hf_source(source)[0])
        files = sorted(_files_under(root))
    else:
        root = storage.path(source)
        if not root.exists():
            raise FileNotFoundError(f"data.source={source}: no such file")
        files = [root]
    stats = [(os.fspath(f), f.stat()) for f in files]
    identity = _digest(
        source,
        *((name, st.length, getattr(st, "mtime", None), getattr(st, "owner", None)) for name, st in stats),
    )
    memo = storage.path(cache_dir) / "sources" / f"{identity}.txt"
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for f in files:
        h.update(os.fspath(f.relative_to(root) if f != root else f.name).encode() + b"\0")
        with f.open("rb") as handle:
            while block := handle.read(1 << 24):
                h.update(block)
    value = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(memo, value)
    return value


def tokenizer_fingerprint(tokenizer: ChatTokenizer) -> str:
    return _digest(
        tokenizer.tokenizer.to_str().encode("utf-8"),
        tokenizer.chat_templates,
        {k: v for k, v in tokenizer.special.items() if v is not None},
    )


def cache_key(source_hash: str, tokenizer: ChatTokenizer, settings: Mapping[str, Any]) -> str:
    # The per-example columns a shard stores are in the key: a cache built before a column was
    # batched lacks it, and a later run must rebuild rather than train without it.
    columns = sorted(EXTRA_DTYPES)
    return _digest(VERSION, columns, source_hash, tokenizer_fingerprint(tokenizer), dict(settings))[:32]


# ------------------------------------------------------------------------------------------ coordination


class Coordinator:
    """Barriers and agreement between the ``jax.distributed`` processes, when the data's processes
    are real ones (a caller simulating several processes in one gets no-ops)."""

    def __init__(self, process_index: int, process_count: int):
        import jax

        self.real = process_count > 1 and jax.process_count() == process_count
        self.process_index = process_index

    def barrier(self, name: str) -> None:
        if self.real:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    def first(self, compute: Any) -> str:
        """``compute()`` (a hex string) run by process 0 only and given to all."""
        if not self.real:
            return compute()
        from jax.experimental import multihost_utils

        value = compute() if self.process_index == 0 else "0" * 64
        out = multihost_utils.broadcast_one_to_all(np.frombuffer(value.encode(), np.uint8))
        return bytes(np.asarray(out, np.uint8)).decode()

    def all(self, flag: bool) -> bool:
        """True when ``flag`` is true on every process (one decision for all of them)."""
        if not self.real:
            return flag
        from jax.experimental import multihost_utils

        return bool(np.all(multihost_utils.process_allgather(np.array([flag], np.int32))))


# ------------------------------------------------------------------------------------------ build


def _share(source: str, shard: int, num_shards: int) -> Iterator[tuple[int, Any]]:
    if source.startswith("hf:"):
        return readers.hf_share(source, shard, num_shards)
    if source.endswith(".parquet"):
        return readers.parquet_share(source, shard, num_shards)
    return readers.jsonl_share(source, shard, num_shards)


def _error_json(e: DataError) -> list[Any]:
    return [int(e.where), e.reason, e.problem]


def build_shard(
    source: str,
    shard: int,
    num_shards: int,
    tokenizer: ChatTokenizer,
    out_dir: str,
    *,
    kind: str,
    on_bad_row: str,
    options: Mapping[str, Any],
) -> None:
    """Writes shard ``shard`` of ``num_shards`` of ``source`` into the local directory ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    rec_line, rec_example, rec_deltas, rec_hash = [], [], [], []
    tok_skips: list[list[Any]] = []
    val_skips: collections.Counter = collections.Counter()
    val_messages: list[list[Any]] = []
    meta: dict[str, Any] = {"version": VERSION, "error": None}
    pending: list[tuple[int, dict[str, Any]]] = []
    rows_read = lines = 0
    with open(os.path.join(out_dir, "tokens.bin"), "wb") as sink:
        writer = ColumnWriter(sink)

        def flush() -> None:
            rows = tokenize_rows(
                [r for _, r in pending], [str(line) for line, _ in pending], tokenizer, **options
            )
            for (line, rec), row in zip(pending, rows):
                err = row.result if isinstance(row.result, DataError) else None
                if err is not None and on_bad_row == "error" and err.reason not in ALWAYS_SKIP:
                    meta["error"] = _error_json(err)
                    break
                if err is not None:
                    tok_skips.append([len(rec_line), err.reason, err.problem])
                    rec_example.append(-1)
                else:
                    rec_example.append(len(writer))
                    writer.add(row.result)
                rec_line.append(line)
                rec_deltas.append((row.truncated_prompts, row.truncated_completions, row.boundary_shifts))
                rec_hash.append(np.frombuffer(schema.record_key(rec), np.uint64)[0])
            pending.clear()

        for line, raw in _share(source, shard, num_shards):
            lines = line
            if raw is None:  # a blank line: numbered, not a row
                continue
            rows_read += 1
            try:
                records = readers.validate_row(raw, kind, str(line))
            except DataError as e:
                if on_bad_row == "error":
                    flush()  # an earlier row's tokenization error comes first
                    meta["error"] = meta["error"] or _error_json(e)
                    break
                val_skips[e.reason] += 1
                if len(val_messages) < MAX_MESSAGES:
                    val_messages.append(_error_json(e))
                continue
            pending.extend((line, rec) for rec in records)
            if len(pending) >= CHUNK:
                flush()
                if meta["error"]:
                    break
        if pending and not meta["error"]:
            flush()
        arrays = writer.finish()
    arrays.update(
        rec_line=np.asarray(rec_line, np.int64),
        rec_example=np.asarray(rec_example, np.int64),
        rec_deltas=np.asarray(rec_deltas, np.int64).reshape(-1, 3),
        rec_hash=np.asarray(rec_hash, np.uint64),
    )
    for name, arr in arrays.items():
        np.save(os.path.join(out_dir, f"{name}.npy"), arr)
    meta.update(
        lines=lines,
        rows_read=rows_read,
        num_tokens=writer.num_tokens,
        arrays=sorted(arrays),
        validation_skips=dict(val_skips),
        validation_messages=val_messages,
        tokenization_skips=tok_skips,
    )
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def _publish(local_dir: str, target: Any) -> None:
    """Makes the finished ``local_dir`` appear at ``target`` whole: a rename locally; on an object
    store each file uploaded, ``meta.json`` last (a shard without it is not there)."""
    if storage.is_local(target):
        try:
            os.rename(local_dir, target)
        except OSError:  # another process (or run) published the same content first
            shutil.rmtree(local_dir, ignore_errors=True)
        return
    target = storage.path(target)
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(local_dir), key=lambda n: n == "meta.json")
    for name in names:
        with open(os.path.join(local_dir, name), "rb") as f:
            (target / name).write_bytes(f.read())
    shutil.rmtree(local_dir, ignore_errors=True)


def _clean_stale(root: Any, name: str) -> None:
    if not storage.is_local(root) or not os.path.isdir(root):
        return
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.startswith(f".tmp-{name}-") and time.time() - os.path.getmtime(path) > STALE_TMP_S:
            shutil.rmtree(path, ignore_errors=True)


def _local_copy(shard_dir: Any, key: str, name: str) -> str:
    """A local directory holding ``shard_dir`` (itself when local; else a copy, made once)."""
    if storage.is_local(shard_dir):
        return os.fspath(shard_dir)
    local = os.path.join(tempfile.gettempdir(), "alignjax-data-cache", key, name)
    if os.path.exists(os.path.join(local, "meta.json")):
        return local
    tmp = f"{local}.tmp-{uuid.uuid4().hex}"
    os.makedirs(tmp)
    for child in storage.path(shard_dir).iterdir():
        with open(os.path.join(tmp, child.name), "wb") as f:
            f.write(child.read_bytes())
    os.makedirs(os.path.dirname(local), exist_ok=True)
    _publish(tmp, local)
    return local


# ------------------------------------------------------------------------------------------ read


class Cached:
    """Every shard of one cache, mapped: the examples (a :class:`~alignjax.data.store.Concat`) and,
    per validated record (in source order), ``rec_example`` (global example index or -1),
    ``rec_deltas`` [n, 3] (truncated prompts, truncated completions, boundary shifts) and
    ``rec_hash``; ``tokenization_skips`` as ``(record, DataError)``; the validation counts."""

    def __init__(self, source: str, dirs: list[str]):
        metas = []
        for d in dirs:
            with open(os.path.join(d, "meta.json")) as f:
                metas.append(json.load(f))
        bases = np.concatenate([[0], np.cumsum([m["lines"] for m in metas])]).astype(np.int64)
        for m, base in zip(metas, bases):
            if m["error"]:
                line, reason, problem = m["error"]
                raise DataError(readers.row_where(source, base + line), reason, problem)
        stores, rec_example, rec_deltas, rec_hash, self.rec_line = [], [], [], [], []
        self.tokenization_skips: list[tuple[int, DataError]] = []
        self.validation_skips: collections.Counter = collections.Counter()
        self.validation_messages: list[str] = []
        self.rows_read, num_records, num_examples = 0, 0, 0
        for d, m, base in zip(dirs, metas, bases):
            arrays = {n: np.load(os.path.join(d, f"{n}.npy"), mmap_mode="r") for n in m["arrays"]}
            n_tok = m["num_tokens"]
            tokens = (
                np.memmap(os.path.join(d, "tokens.bin"), np.int32, "r", shape=(n_tok,))
                if n_tok
                else np.zeros(0, np.int32)
            )
            lines = np.asarray(arrays["rec_line"]) + base
            example_line = np.full(len(arrays["example_seqs"]) - 1, -1, np.int64)
            kept = np.asarray(arrays["rec_example"]) >= 0
            example_line[np.asarray(arrays["rec_example"])[kept]] = lines[kept]
            where = lambda i, el=example_line: readers.row_where(source, el[i])  # noqa: E731
            stores.append(Store(dict(arrays, tokens=tokens), where))
            re = np.asarray(arrays["rec_example"])
            rec_example.append(np.where(re >= 0, re + num_examples, -1))
            rec_deltas.append(np.asarray(arrays["rec_deltas"]))
            rec_hash.append(np.asarray(arrays["rec_hash"]))
            self.rec_line.append(lines)
            for rec, reason, problem in m["tokenization_skips"]:
                where = readers.row_where(source, lines[rec])
                self.tokenization_skips.append((rec + num_records, DataError(where, reason, problem)))
            self.validation_skips.update(m["validation_skips"])
            for line, reason, problem in m["validation_messages"]:
                if len(self.validation_messages) < MAX_MESSAGES:
                    self.validation_messages.append(
                        str(DataError(readers.row_where(source, base + line), reason, problem))
                    )
            self.rows_read += m["rows_read"]
            num_records += len(re)
            num_examples += len(stores[-1])
        self.store = Concat(stores)
        self.rec_example = np.concatenate(rec_example) if rec_example else np.zeros(0, np.int64)
        self.rec_deltas = np.concatenate(rec_deltas) if rec_deltas else np.zeros((0, 3), np.int64)
        self.rec_hash = np.concatenate(rec_hash) if rec_hash else np.zeros(0, np.uint64)
        self.duplicates = len(self.rec_hash) - len(np.unique(self.rec_hash))


def load(
    source: str,
    tokenizer: ChatTokenizer,
    cache_dir: str,
    *,
    kind: str,
    on_bad_row: str,
    options: Mapping[str, Any],
    process_index: int,
    process_count: int,
) -> Cached:
    """The cache of ``source``: read when complete, else built (process ``p`` builds shard ``p`` of
    ``process_count``; a shard missing after the barrier, as when one process stands for several,
    is built by whoever misses it)."""
    settings = dict(kind=kind, on_bad_row=on_bad_row, **options)
    coord = Coordinator(process_index, process_count)
    key = cache_key(coord.first(lambda: source_fingerprint(source, cache_dir)), tokenizer, settings)
    root = storage.path(cache_dir) / key
    index = root / "index.json"
    if coord.all(index.exists()):
        names = json.loads(index.read_text())["shards"]
    else:
        names = [shard_name(p, process_count) for p in range(process_count)]

        def ensure(p: int) -> None:
            target = root / names[p]
            if (target / "meta.json").exists():
                return
            local_root = os.fspath(root) if storage.is_local(root) else tempfile.gettempdir()
            os.makedirs(local_root, exist_ok=True)
            _clean_stale(local_root, names[p])
            tmp = os.path.join(local_root, f".tmp-{names[p]}-{uuid.uuid4().hex}")
            try:
                build_shard(
                    source,
                    p,
                    process_count,
                    tokenizer,
                    tmp,
                    kind=kind,
                    on_bad_row=on_bad_row,
                    options=options,
                )
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _publish(tmp, os.fspath(target) if storage.is_local(target) else target)

        ensure(process_index)
        coord.barrier(f"alignjax-data-cache-{key}")
        for p in range(process_count):
            ensure(p)
    cached = Cached(source, [_local_copy(root / n, key, n) for n in names])
    if process_index == 0 and not index.exists():
        _write_atomic(index, json.dumps({"version": VERSION, "shards": names, "settings": settings}))
    return cached
