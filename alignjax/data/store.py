"""Tokenized examples as columns: one flat int32 token array, offsets, per-example arrays.

A Python list of ints costs about 36 bytes a token; these columns cost 4, and on disk they are
memory-mapped, so a process pays only for the pages its batches touch (:mod:`alignjax.data.cache`).

Layout (``n`` examples, ``s`` sequences): sequence ``j`` is ``tokens[seq_offsets[j]:seq_offsets[j+1]]``;
example ``i`` owns sequences ``example_seqs[i] .. example_seqs[i+1]-1``, the first its prompt and
the rest its completions. Each scalar extra ``key`` present on some examples is ``x_<key>_idx``
(sorted example indices) and ``x_<key>_val``; a list extra (``scores``, ``prefix_lengths``,
``degree_labels``: one value per completion, degraded response or source model) adds
``x_<key>_off`` (offsets into its values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np

from alignjax.data.schema import BATCH_FLOAT_FIELDS
from alignjax.data.tokenize import TokenizedExample

EXTRA_DTYPES = {
    "label": np.bool_, "user_id": np.int64, "scores": np.float64, "prefix_lengths": np.int64,
    "degree_labels": np.int64,
}
EXTRA_DTYPES.update({k: np.float64 for k in BATCH_FLOAT_FIELDS})
LIST_EXTRAS = ("scores", "prefix_lengths", "degree_labels", "source_chosen_logps", "source_rejected_logps")


class ColumnWriter:
    """Accumulates examples as columns; tokens go to ``token_sink`` (a binary file) when given,
    else to memory. :meth:`finish` returns the arrays (``tokens`` only for the in-memory case)."""

    def __init__(self, token_sink: BinaryIO | None = None):
        self.sink = token_sink
        self.chunks: list[np.ndarray] = []
        self.seq_lengths: list[int] = []
        self.example_nseq: list[int] = []
        self.extra_idx: dict[str, list[int]] = {}
        self.extra_val: dict[str, list[Any]] = {}
        self.pending: list[np.ndarray] = []
        self.pending_size = 0
        self.num_tokens = 0

    def __len__(self) -> int:
        return len(self.example_nseq)

    def add(self, ex: TokenizedExample) -> None:
        i = len(self.example_nseq)
        seqs = [ex.prompt, *ex.completions]
        for seq in seqs:
            arr = np.asarray(seq, np.int32)
            self.pending.append(arr)
            self.pending_size += arr.size
            self.seq_lengths.append(arr.size)
        self.example_nseq.append(len(seqs))
        for key, value in ex.extras.items():
            if key not in EXTRA_DTYPES:
                continue
            self.extra_idx.setdefault(key, []).append(i)
            self.extra_val.setdefault(key, []).append(value)
        if self.pending_size >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        block = np.concatenate(self.pending)
        self.num_tokens += block.size
        if self.sink is None:
            self.chunks.append(block)
        else:
            self.sink.write(block.tobytes())
        self.pending, self.pending_size = [], 0

    def finish(self) -> dict[str, np.ndarray]:
        self._flush()
        out = {
            "seq_offsets": np.concatenate([[0], np.cumsum(self.seq_lengths, dtype=np.int64)]).astype(
                np.int64
            ),
            "example_seqs": np.concatenate([[0], np.cumsum(self.example_nseq, dtype=np.int64)]).astype(
                np.int64
            ),
        }
        if self.sink is None:
            out["tokens"] = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int32)
        for key, idx in self.extra_idx.items():
            values = self.extra_val[key]
            out[f"x_{key}_idx"] = np.asarray(idx, np.int64)
            if key in LIST_EXTRAS:
                out[f"x_{key}_off"] = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(
                    np.int64
                )
                out[f"x_{key}_val"] = np.asarray([s for v in values for s in v], EXTRA_DTYPES[key])
            else:
                out[f"x_{key}_val"] = np.asarray(values, EXTRA_DTYPES[key])
        return out


def _python(key: str, value: Any) -> Any:
    if key == "label":
        return bool(value)
    if key in ("user_id", "prefix_lengths", "degree_labels"):
        return int(value)
    return float(value)


class Store:
    """Examples ``0..n-1`` over the columns of one :class:`ColumnWriter` (in memory or mapped)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], where: Callable[[int], str]):
        self.arrays = arrays
        self.tokens = arrays["tokens"]
        self.seq_offsets = arrays["seq_offsets"]
        self.example_seqs = arrays["example_seqs"]
        self.where = where
        self.extras = sorted(k[2:-4] for k in arrays if k.startswith("x_") and k.endswith("_idx"))

    def __len__(self) -> int:
        return len(self.example_seqs) - 1

    def example(self, i: int) -> TokenizedExample:
        a, b = int(self.example_seqs[i]), int(self.example_seqs[i + 1])
        offs = self.seq_offsets[a : b + 1]
        seqs = [self.tokens[offs[j] : offs[j + 1]].tolist() for j in range(b - a)]
        extras: dict[str, Any] = {}
        for key in self.extras:
            idx = self.arrays[f"x_{key}_idx"]
            pos = int(np.searchsorted(idx, i))
            if pos == len(idx) or idx[pos] != i:
                continue
            values = self.arrays[f"x_{key}_val"]
            if key in LIST_EXTRAS:
                off = self.arrays[f"x_{key}_off"]
                extras[key] = [_python(key, v) for v in values[off[pos] : off[pos + 1]]]
            else:
                extras[key] = _python(key, values[pos])
        return TokenizedExample(seqs[0], seqs[1:], extras, self.where(i))


class Concat:
    """Several stores (the shards of a cache) as one, examples in shard order."""

    def __init__(self, stores: Sequence[Store]):
        self.stores = list(stores)
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in self.stores])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def example(self, i: int) -> TokenizedExample:
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.stores[s].example(i - int(self.starts[s]))


class ExamplesView(Sequence):
    """``store``'s examples at ``index`` (in that order) as TokenizedExamples, built on access."""

    def __init__(self, store: Store | Concat, index: np.ndarray):
        self.store, self.index = store, np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.store.example(int(j)) for j in self.index[i]]
        return self.store.example(int(self.index[i]))

    def __iter__(self) -> Iterator[TokenizedExample]:
        return (self.store.example(int(j)) for j in self.index)
