"""Implicit-reward scoring of a DPO policy on preference pairs, RewardBench's protocol: the pieces of
the ``score`` job (:mod:`alignjax.jobs.score`) that the annotation jobs and the reward-model
evaluation reuse.

Pairs are loaded and tokenized (:func:`load_pairs`, :func:`as_pairs`), batched in the padded
sequence-batch layout with a fixed shape (:func:`pair_batch`), and every completion's implicit reward
(:func:`alignjax.eval.rewardbench.implicit_rewards`) and sequence log-probs computed in order
(:func:`score_examples`: nothing is dropped, the last partial batch is padded with copies that are
scored and discarded); :func:`summarize` gives the job's figures (pair accuracy with ties wrong,
mean margin, per-subset and RewardBench section scores, ranking accuracy). :func:`load_model` loads
a policy or reference: a preset, an HF directory, or a training workdir ``DIR[@STEP]``
(:func:`alignjax.export.load_run`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from alignjax import export, logprobs, models, sharding
from alignjax.data import DataStats, readers
from alignjax.data.pipeline import resolve_source, tokenize_all
from alignjax.data.tokenize import TokenizedExample
from alignjax.eval import ranking, rewardbench

# One scored sequence: its ids and how many of them are prompt (not rewarded).
Sequence_ = tuple[list[int], int]


def load_pairs(
    source: Any, tokenizer: Any, *, max_length: int | None, on_bad_row: str, stats: DataStats
) -> tuple[list[TokenizedExample], list[Mapping[str, Any]]]:
    """Validated, tokenized pairs and the records they came from (the rows kept, in order)."""
    records = readers.load_records(resolve_source(source), "pairwise", on_bad_row, stats)
    return tokenize_all(records, tokenizer, on_bad_row=on_bad_row, stats=stats, max_length=max_length)


def subset_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each row's RewardBench subset (``"all"`` where the row has none)."""
    return [record.get("subset", "all") for record in records]


def make_reward_fn(model: Any, *, mode: str, num_pairs: int, reference: Any = None):
    """jit(params, ref_params, batch) -> (rewards [2B], sequence log-probs [2B], ref log-probs or 0).

    ``reference``: the reference's own ``Model`` (None: no reference), which applies ``ref_params``:
    its layer layout (unrolled or scanned) and adapters need not be the policy's.
    """
    n = 2 * num_pairs

    def reward_fn(params: Any, ref_params: Any, batch: dict[str, jax.Array]):
        seq, tok = logprobs.batch_sequence_logps(model, params, batch, n)
        ref_seq, ref_tok = (
            logprobs.batch_sequence_logps(reference, ref_params, batch, n)
            if reference is not None
            else (seq * 0, None)
        )
        rewards = rewardbench.implicit_rewards(
            tok, batch["loss_mask"], batch["example_ids"], n, ref_tok, mode=mode
        )
        return rewards, seq, ref_seq

    return jax.jit(reward_fn, compiler_options=logprobs.strict_rounding(model.config.dtype))


def as_pairs(examples: Sequence[TokenizedExample]) -> list[tuple[Sequence_, Sequence_]]:
    """The data pipeline's examples as (chosen, rejected) sequences with their prompt lengths."""
    n = lambda ex: len(ex.prompt)  # noqa: E731
    return [
        ((ex.prompt + ex.completions[0], n(ex)), (ex.prompt + ex.completions[1], n(ex))) for ex in examples
    ]


def pair_batch(
    pairs: Sequence[tuple[Sequence_, Sequence_]], length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """The padded sequence-batch layout of ``B`` pairs: row ``i`` chosen ``i``, row ``B + i`` rejected
    ``i``, right-padded to ``length``; ``loss_mask`` covers each sequence after its prompt."""
    seqs = [p[0] for p in pairs] + [p[1] for p in pairs]
    batch = {
        "input_ids": np.full((len(seqs), length), pad_id, np.int32),
        "positions": np.zeros((len(seqs), length), np.int32),
        "segment_ids": np.zeros((len(seqs), length), np.int32),
        "loss_mask": np.zeros((len(seqs), length), np.float32),
        "example_ids": np.full((len(seqs), length), -1, np.int32),
    }
    for i, (ids, prompt_length) in enumerate(seqs):
        n = len(ids)
        batch["input_ids"][i, :n] = ids
        batch["positions"][i, :n] = np.arange(n)
        batch["segment_ids"][i, :n] = 1
        batch["loss_mask"][i, prompt_length:n] = 1.0
        batch["example_ids"][i, :n] = i
    return batch


def score_examples(
    model: Any,
    params: Any,
    reference: Any,
    pairs: Sequence[tuple[Sequence_, Sequence_]],
    *,
    mode: str,
    mesh: Any,
    batch_size: int,
    pad_id: int,
    max_length: int | None,
) -> dict[str, np.ndarray]:
    """Rewards and log-probs of every pair, in order: ``chosen_rewards``, ``rejected_rewards``, ...

    ``reference``: the reference ``Model`` with its ``.params`` (None: reference-free modes).
    Batches have one fixed shape (``batch_size`` pairs padded to ``max_length``, or to the longest
    sequence rounded up to a multiple of 8) so the function compiles once.
    """
    if not pairs:
        raise ValueError("no pairs to score (every row was skipped or the source is empty)")
    longest = max(len(seq[0]) for pair in pairs for seq in pair)
    length = max_length or -(-longest // 8) * 8
    reward_fn = make_reward_fn(model, mode=mode, num_pairs=batch_size, reference=reference)
    ref_params = None if reference is None else reference.params
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("rewards", "logps", "ref_logps")}
    for start in range(0, len(pairs), batch_size):
        chunk = list(pairs[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)  # fixed shape; the copies are discarded below
        local = sharding.process_share(chunk)  # every process holds all pairs and scores its share
        host = sharding.global_sequence_ids(pair_batch(local, length, pad_id), examples=len(local))
        outputs = reward_fn(params, ref_params, sharding.global_batch(mesh, host))
        for key, value in zip(columns, outputs, strict=True):
            chosen, rejected = np.split(np.asarray(multihost_utils.process_allgather(value, tiled=True)), 2)
            columns[key].append(np.stack([chosen[:real], rejected[:real]], axis=1))
    out = {}
    for key, parts in columns.items():
        stacked = np.concatenate(parts)
        out[f"chosen_{key}"], out[f"rejected_{key}"] = stacked[:, 0], stacked[:, 1]
    return out


def summarize(
    scores: dict[str, np.ndarray], subsets: Sequence[str], *, with_reference: bool
) -> dict[str, Any]:
    """The summary.json figures of a scored set (accuracy with ties counted wrong)."""
    chosen, rejected = scores["chosen_rewards"], scores["rejected_rewards"]
    accuracies, counts = rewardbench.subset_accuracies(subsets, chosen, rejected)
    summary: dict[str, Any] = {
        "num_pairs": int(len(chosen)),
        "accuracy": float(np.mean(chosen > rejected)),
        "reward_margin_mean": float(np.mean(chosen - rejected)),
        "rewards/chosen": float(np.mean(chosen)),
        "rewards/rejected": float(np.mean(rejected)),
        "ranking_accuracy": float(ranking.ranking_accuracy(scores["chosen_logps"], scores["rejected_logps"])),
        "subsets": {name: {"accuracy": accuracies[name], "count": counts[name]} for name in accuracies},
    }
    if set(subsets) != {"all"}:
        summary["sections"] = rewardbench.section_scores(accuracies, counts)
    if with_reference:
        summary.update(
            ranking.ranking_report(
                scores["chosen_logps"],
                scores["rejected_logps"],
                scores["chosen_ref_logps"],
                scores["rejected_ref_logps"],
            )
        )
    return summary


def load_model(path: str, *, mesh: Any, rules: Any, dtype: str, compute_dtype: str | None) -> Any:
    """A policy or reference: a training workdir ``DIR[@STEP]`` (its checkpoint, in the dtypes it
    was trained with), else a preset or an HF directory (``dtype``/``compute_dtype``)."""
    if export.is_workdir(path):
        run = export.load_run(path, mesh=mesh, rules=rules)
        if run.is_reward_model:
            raise ValueError(f"{path}: a reward-model run; score.py scores policies by their implicit reward")
        return run.model
    return models.from_pretrained(path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, rules=rules)


