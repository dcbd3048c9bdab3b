"""Batch layouts: padded (length-bucketed), packed (first-fit with segment ids), shared prompt.

A *sequence batch* is a dict of numpy arrays ``[R, T]``:

* ``input_ids`` int32, ``positions`` int32, ``segment_ids`` int32 (0 = padding; 1.. per packed
  segment), ``branch_ids`` int32 (shared-prompt layout only: 0 prompt, 1 chosen, 2 rejected);
* ``loss_mask`` float32: 1 where token t is a completion token whose log-prob
  p(token_t | earlier tokens of its segment/branch) counts; always 0 on a segment's/branch's first token;
* ``example_ids`` int32: the sequence each token belongs to (-1 none). Sequences are numbered
  completion-major: for B pairs, 0..B-1 are the chosen and B..2B-1 the rejected completions (and
  2B..3B-1 the rationales, or 2B..3B-1 and 3B..4B-1 SPO's degraded chosen and rejected responses,
  when the loss reads them); for
  listwise batches with K candidates, sequence ``k*B + i`` is candidate k of example i; unpaired 0..B-1
  (the pipeline adds KTO's mismatched sequences as B..2B-1, :func:`with_kl_completions`).

Per-example arrays ride along: ``chosen_lengths``/``rejected_lengths`` int32 [B] (completion tokens
counted by the loss, pairs; a completion's own prefix, see :mod:`alignjax.data.tokenize`, is not
counted) or ``lengths`` ([B] unpaired/sft, [B, K] listwise); ``label`` bool,
``margin``/``score``/``weight``/``ref_*_logps``/``source_*_logps``/``*_visits`` float32, ``user_id``
int32, ``scores`` float32 [B, K], ``degree_labels`` int32 [B, 2] (SPO's classes of the degraded
responses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from alignjax.data.schema import BATCH_FLOAT_FIELDS, DataStats
from alignjax.data.tokenize import TokenizedExample

LAYOUTS = ("padded", "packed", "shared_prompt")


def sequences(examples: Sequence[TokenizedExample]) -> list[tuple[list[int], list[float]]]:
    """Flattens examples to ``(ids, loss_mask)`` per sequence, completion-major (see module doc)."""
    num = {len(ex.completions) for ex in examples}
    if len(num) != 1:
        raise ValueError(f"examples in one batch must have the same number of completions, got {sorted(num)}")
    (k,) = num
    out = []
    for j in range(k):
        for ex in examples:
            comp, prefix = ex.completions[j], ex.prefix_length(j)
            mask = [0.0] * (len(ex.prompt) + prefix) + [1.0] * (len(comp) - prefix)
            mask[0] = 0.0  # nothing predicts a segment's first token
            out.append((list(ex.prompt) + list(comp), mask))
    return out


def counted_width(layout: str, max_completion_length: int | None) -> int | None:
    """The most counted tokens (``loss_mask > 0``) a row of ``layout`` can hold when every completion
    is cut to ``max_completion_length`` (``data.max_completion_length``): a padded row is one
    sequence, whose counted tokens are its completion's. None where rows have no such bound (packed
    rows; shared-prompt rows, whose branch count varies; no cut)."""
    if layout != "padded" or not max_completion_length:
        return None
    return int(max_completion_length)


def bucket_length(n: int, buckets: Sequence[int] | None, default: int | None = None) -> int:
    """The smallest bucket >= n (few distinct shapes, few compilations); ``default`` when no buckets."""
    if not buckets:
        if default is None:
            return n
        if n > default:
            raise ValueError(f"sequence of {n} tokens exceeds the row length {default}")
        return default
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    raise ValueError(
        f"sequence of {n} tokens is longer than the largest length bucket {max(buckets)} "
        "(config key data.buckets); add a larger bucket or lower max_length"
    )


def _empty(rows: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.full((rows, length), pad_id, np.int32),
        "positions": np.zeros((rows, length), np.int32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "loss_mask": np.zeros((rows, length), np.float32),
        "example_ids": np.full((rows, length), -1, np.int32),
    }


def pad_to_multiple(batch: dict[str, np.ndarray], multiple: int | None, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pads every ``[R, T]`` array so ``T`` is a multiple of ``multiple`` (TRL's
    ``pad_to_multiple_of``; e.g. 128 for the TPU splash kernel). The new columns are padding."""
    length = batch["input_ids"].shape[1]
    if not multiple or length % multiple == 0:
        return batch
    extra = multiple - length % multiple
    fill = _empty(batch["input_ids"].shape[0], extra, pad_id)
    fill["branch_ids"] = np.zeros_like(fill["positions"])
    return {k: np.concatenate([v, fill[k]], axis=1) for k, v in batch.items()}


def _record_padding(batch: dict[str, np.ndarray], stats: DataStats | None) -> None:
    if stats is not None:
        stats.tokens_real += int((batch["segment_ids"] > 0).sum())
        stats.tokens_total += int(batch["segment_ids"].size)


def padded_batch(
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    buckets: Sequence[int] | None = None,
    max_length: int | None = None,
) -> dict[str, np.ndarray]:
    """Row i = sequence i, right-padded to the smallest bucket holding the longest (else ``max_length``)."""
    seqs = sequences(examples)
    length = bucket_length(max(len(s) for s, _ in seqs), buckets, max_length)
    batch = _empty(len(seqs), length, pad_id)
    for i, (ids, mask) in enumerate(seqs):
        n = len(ids)
        batch["input_ids"][i, :n] = ids
        batch["positions"][i, :n] = np.arange(n)
        batch["segment_ids"][i, :n] = 1
        batch["loss_mask"][i, :n] = mask
        batch["example_ids"][i, :n] = i
    return batch


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit bin packing in the given order: each item goes to the first row with room."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(
                f"sequence of {n} tokens does not fit a packed row of {capacity} (data.pack_length)"
            )
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def packed_batch(
    examples: Sequence[TokenizedExample], *, pad_id: int, pack_length: int, rows: int | None = None
) -> dict[str, np.ndarray]:
    """Sequences first-fit packed into ``rows`` rows of ``pack_length``; positions restart per segment.

    ``rows`` is static (shapes never change); it defaults to the number of sequences (always fits).
    """
    seqs = sequences(examples)
    rows = len(seqs) if rows is None else rows
    assignment = first_fit([len(s) for s, _ in seqs], pack_length)
    if len(assignment) > rows:
        raise ValueError(
            f"packing {len(seqs)} sequences into rows of {pack_length} tokens needs "
            f"{len(assignment)} rows but data.pack_rows={rows}; raise pack_rows or pack_length"
        )
    batch = _empty(rows, pack_length, pad_id)
    for r, members in enumerate(assignment):
        start = 0
        for seg, i in enumerate(members, start=1):
            ids, mask = seqs[i]
            sl = slice(start, start + len(ids))
            batch["input_ids"][r, sl] = ids
            batch["positions"][r, sl] = np.arange(len(ids))
            batch["segment_ids"][r, sl] = seg
            batch["loss_mask"][r, sl] = mask
            batch["example_ids"][r, sl] = i
            start += len(ids)
    return batch


def shared_prompt_batch(
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    buckets: Sequence[int] | None = None,
    max_length: int | None = None,
) -> dict[str, np.ndarray]:
    """One row per pair: ``[prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected]``.

    Each branch starts with a copy of the last prompt token at position ``P-1`` so that ordinary
    shifted next-token alignment holds inside each branch (its first token is never scored). Shared
    prompt tokens (branch 0) carry example id i (the chosen sequence's id); the rejected branch
    carries B+i. The attention rule (branch b attends to branch 0 and to itself) is the log-prob
    code's job. Default row length when there are no buckets: ``2 * max_length``.
    """
    if any(len(ex.completions) != 2 for ex in examples):
        raise ValueError("shared_prompt layout needs pairs (exactly two completions per example)")
    if any("prefix_lengths" in ex.extras for ex in examples):
        raise ValueError(
            "shared_prompt layout needs one prompt per pair; rows with chosen_prompt/rejected_prompt "
            "need data.layout 'padded' or 'packed'"
        )
    b = len(examples)
    lengths = [len(ex.prompt) + len(ex.completions[0]) + len(ex.completions[1]) + 1 for ex in examples]
    length = bucket_length(max(lengths), buckets, None if max_length is None else 2 * max_length)
    batch = _empty(b, length, pad_id)
    batch["branch_ids"] = np.zeros((b, length), np.int32)
    for i, ex in enumerate(examples):
        p = len(ex.prompt)
        parts = [(ex.prompt[:-1], 0, i, np.arange(p - 1), 0.0)]
        for branch, comp in ((1, ex.completions[0]), (2, ex.completions[1])):
            seq_id = i if branch == 1 else b + i
            parts.append(([ex.prompt[-1], *comp], branch, seq_id, np.arange(p - 1, p + len(comp)), 1.0))
        start = 0
        for ids, branch, seq_id, pos, score in parts:
            sl = slice(start, start + len(ids))
            batch["input_ids"][i, sl] = ids
            batch["positions"][i, sl] = pos
            batch["segment_ids"][i, sl] = 1
            batch["branch_ids"][i, sl] = branch
            batch["example_ids"][i, sl] = seq_id
            if score:
                batch["loss_mask"][i, start + 1 : start + len(ids)] = 1.0
            start += len(ids)
    return batch


def example_arrays(examples: Sequence[TokenizedExample]) -> dict[str, np.ndarray]:
    """Per-example arrays: completion lengths and the scalar extras (all-or-none per batch)."""
    out: dict[str, np.ndarray] = {}
    k = len(examples[0].completions)
    lengths = np.array(
        [[len(c) - ex.prefix_length(j) for j, c in enumerate(ex.completions)] for ex in examples], np.int32
    )  # [B, K]
    if k >= 2 and "scores" not in examples[0].extras:  # pairs (a third: the rationale) and KTO's
        out["chosen_lengths"], out["rejected_lengths"] = lengths[:, 0], lengths[:, 1]
    else:
        out["lengths"] = lengths[:, 0] if k == 1 else lengths
    keys = set().union(*(ex.extras for ex in examples))
    for key in sorted(keys):
        missing = [ex.where for ex in examples if key not in ex.extras]
        if missing and key == "weight":
            values = [ex.extras.get("weight", 1.0) for ex in examples]
        elif missing:
            raise ValueError(
                f"field {key!r} is present on some rows but missing at {missing[0]}; "
                "give it on every row or on none"
            )
        else:
            values = [ex.extras[key] for ex in examples]
        if key == "label":
            out[key] = np.array(values, np.bool_)
        elif key in ("user_id", "degree_labels"):
            out[key] = np.array(values, np.int32)
        elif key == "scores":
            out[key] = np.array(values, np.float32)
        elif key in BATCH_FLOAT_FIELDS:
            if isinstance(values[0], list) and len({len(v) for v in values}) > 1:
                at = next(ex.where for ex in examples if len(ex.extras[key]) != len(values[0]))
                raise ValueError(
                    f"field {key!r} has {len(values[0])} values at {examples[0].where} but a different "
                    f"number at {at}; give the same number (one per source model) on every row"
                )
            out[key] = np.array(values, np.float32)
    return out


def with_kl_completions(
    examples: Sequence[TokenizedExample], max_length: int | None = None
) -> list[TokenizedExample]:
    """Unpaired examples with KTO's mismatched sequence: prompt i with example (i+1) mod B's completion.

    "KTO: Model Alignment as Prospect Theoretic Optimization" (Ethayarajh et al., arXiv:2402.01306)
    estimates its reference point z0 = max(0, mean KL) from (x_i, y_j) pairs with i != j, as TRL does
    within a batch. Laid out as pairs, sequences ``B..2B-1`` of the batch are these mismatched ones.
    The borrowed completion is cut to fit ``max_length`` (the prompt was already budgeted for its own).
    """
    n = len(examples)
    if n < 2:
        raise ValueError(
            "KTO's KL estimate pairs each prompt with another example's completion: unpaired batches "
            f"need at least 2 examples per process, got {n} (config key data.batch_size)"
        )
    out = []
    for i, ex in enumerate(examples):
        other = examples[(i + 1) % n].completions[0]
        room = len(other) if max_length is None else max(max_length - len(ex.prompt), 1)
        out.append(dataclasses.replace(ex, completions=[ex.completions[0], other[:room]]))
    return out


def make_batch(
    examples: Sequence[TokenizedExample],
    layout: str,
    *,
    pad_id: int,
    max_length: int | None = None,
    buckets: Sequence[int] | None = None,
    pack_length: int | None = None,
    pack_rows: int | None = None,
    pad_to_multiple_of: int | None = None,
    stats: DataStats | None = None,
) -> dict[str, Any]:
    """One host-local batch in ``layout`` plus the per-example arrays; padding share goes to ``stats``.
    ``pad_to_multiple_of`` rounds the row length up (see :func:`pad_to_multiple`)."""
    if layout == "padded":
        batch = padded_batch(examples, pad_id=pad_id, buckets=buckets, max_length=max_length)
    elif layout == "packed":
        length = pack_length or max_length
        if length is None:
            raise ValueError("packed layout needs data.pack_length (or max_length)")
        batch = packed_batch(examples, pad_id=pad_id, pack_length=length, rows=pack_rows)
    elif layout == "shared_prompt":
        batch = shared_prompt_batch(examples, pad_id=pad_id, buckets=buckets, max_length=max_length)
    else:
        raise ValueError(f"unknown layout {layout!r}; valid layouts are {list(LAYOUTS)}")
    batch = pad_to_multiple(batch, pad_to_multiple_of, pad_id)
    _record_padding(batch, stats)
    batch.update(example_arrays(examples))
    return batch


def padding_fraction(batch: dict[str, np.ndarray]) -> float:
    """Share of the ``[R, T]`` token slots that are padding (segment id 0)."""
    seg = batch["segment_ids"]
    return float((seg == 0).sum() / seg.size)
