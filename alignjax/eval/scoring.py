"""The scoring job: implicit rewards of a DPO policy on preference pairs, RewardBench's protocol.

``python -m alignjax.main --config=experiments/score.py --workdir=DIR`` loads a policy (a preset, an
HF directory, or a training workdir ``DIR[@STEP]``: :func:`alignjax.export.load_run`) and, in
``ref`` mode, a reference; tokenizes every pair of ``config.data.source`` (a ``subset`` column
groups rows as RewardBench does) by ``config.score.tokenization``: ``"rewardbench"``, RewardBench's
DPO scorer (chat template, BOS/EOS, truncation: :mod:`alignjax.eval.rewardbench`), or ``"trl"``,
the training data pipeline's (TRL's DPOTrainer; ``data.max_length`` etc.); computes each
completion's implicit reward (:func:`alignjax.eval.rewardbench.implicit_rewards`) and writes
``summary.json``: pair accuracy (ties wrong), mean margin, per-subset and RewardBench section
scores, ranking accuracy and the data statistics, and ``scores.jsonl``: each pair's subset and
rewards, in input order (RewardBench's ``scores_chosen``/``scores_rejected``). Nothing is dropped: the last
partial batch is padded with copies that are scored and discarded, and skipped rows
(``data.on_bad_row=skip``) are counted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from alignjax import export, logprobs, models, sharding, storage
from alignjax.data import DataStats, readers, resolve_tokenizer
from alignjax.data.pipeline import resolve_source, tokenize_all, tokenize_options
from alignjax.data.tokenize import TokenizedExample
from alignjax.eval import ranking, rewardbench

TOKENIZATIONS = ("rewardbench", "trl")
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


def make_reward_fn(model: Any, *, mode: str, num_pairs: int, with_reference: bool):
    """jit(params, ref_params, batch) -> (rewards [2B], sequence log-probs [2B], ref log-probs or 0)."""
    n = 2 * num_pairs

    def reward_fn(params: Any, ref_params: Any, batch: dict[str, jax.Array]):
        seq, tok = logprobs.batch_sequence_logps(model, params, batch, n)
        ref_seq, ref_tok = (
            logprobs.batch_sequence_logps(model, ref_params, batch, n) if with_reference else (seq * 0, None)
        )
        rewards = rewardbench.implicit_rewards(
            tok, batch["loss_mask"], batch["example_ids"], n, ref_tok, mode=mode
        )
        return rewards, seq, ref_seq

    return jax.jit(reward_fn, compiler_options=logprobs.STRICT_ROUNDING)


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
    ref_params: Any,
    pairs: Sequence[tuple[Sequence_, Sequence_]],
    *,
    mode: str,
    mesh: Any,
    batch_size: int,
    pad_id: int,
    max_length: int | None,
) -> dict[str, np.ndarray]:
    """Rewards and log-probs of every pair, in order: ``chosen_rewards``, ``rejected_rewards``, ...

    Batches have one fixed shape (``batch_size`` pairs padded to ``max_length``, or to the longest
    sequence rounded up to a multiple of 8) so the function compiles once.
    """
    if not pairs:
        raise ValueError("no pairs to score (every row was skipped or the source is empty)")
    longest = max(len(seq[0]) for pair in pairs for seq in pair)
    length = max_length or -(-longest // 8) * 8
    reward_fn = make_reward_fn(model, mode=mode, num_pairs=batch_size, with_reference=ref_params is not None)
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


def tokenize_source(config: Any, tokenizer: Any, stats: DataStats) -> tuple[list, list[Mapping[str, Any]]]:
    """``(pairs, kept records)`` of ``config.data.source`` tokenized by ``config.score.tokenization``."""
    tokenization = config.score.get("tokenization", "trl")
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"config.score.tokenization={tokenization!r}; valid: {list(TOKENIZATIONS)}")
    on_bad_row = config.data.on_bad_row
    records = readers.load_records(resolve_source(config.data.source), "pairwise", on_bad_row, stats)
    if tokenization == "rewardbench":
        return rewardbench.tokenize_records(records, tokenizer, on_bad_row=on_bad_row, stats=stats)
    examples, kept = tokenize_all(
        records,
        tokenizer,
        on_bad_row=on_bad_row,
        stats=stats,
        max_length=config.data.get("max_length") or None,
        **tokenize_options(config.data),
    )
    return as_pairs(examples), kept


def run_score(config: Any, workdir: str) -> dict[str, Any]:
    """The ``score`` job: see the module docstring. Returns the summary (also in summary.json)."""
    mode = config.score.mode
    if mode not in rewardbench.IMPLICIT_REWARD_MODES:
        raise ValueError(f"config.score.mode={mode!r}; valid: {list(rewardbench.IMPLICIT_REWARD_MODES)}")
    if mode == "ref" and not config.reference.path:
        raise ValueError(
            "config.score.mode='ref' needs config.reference.path (the model the policy was trained from); "
            "use mode=avg, sum or norm to score reference-free"
        )
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.get("rules") or None)
    tokenizer = resolve_tokenizer(config.data.tokenizer)
    load = dict(
        mesh=mesh,
        rules=rules,
        dtype=config.model.dtype,
        compute_dtype=config.model.get("compute_dtype") or None,
    )
    policy = load_model(config.model.path, **load)
    reference = load_model(config.reference.path, **load) if mode == "ref" else None
    if tokenizer.vocab_size > policy.config.vocab_size:
        raise ValueError(
            f"tokenizer {config.data.tokenizer!r} has {tokenizer.vocab_size} tokens but model "
            f"{config.model.path!r} only {policy.config.vocab_size} "
            "(config.data.tokenizer / config.model.path)"
        )
    stats = DataStats()
    pairs, records = tokenize_source(config, tokenizer, stats)
    scores = score_examples(
        policy,
        policy.params,
        None if reference is None else reference.params,
        pairs,
        mode=mode,
        mesh=mesh,
        batch_size=int(config.data.eval_batch_size),
        pad_id=tokenizer.pad_id,
        max_length=None,  # truncation happened in tokenization; pad to the longest sequence
    )
    subsets = subset_names(records)
    summary = summarize(scores, subsets, with_reference=reference is not None)
    summary.update(
        {
            "mode": mode,
            "tokenization": config.score.get("tokenization", "trl"),
            "model": config.model.path,
            "reference": config.reference.path if reference is not None else None,
            "source": str(config.data.source),
        }
    )
    summary.update(stats.summary())
    if jax.process_index() == 0:
        root = storage.path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        storage.write_text(root / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
        rows = zip(
            subsets, scores["chosen_rewards"].tolist(), scores["rejected_rewards"].tolist(), strict=True
        )
        storage.write_text(
            root / "scores.jsonl",
            "".join(json.dumps({"subset": s, "chosen": c, "rejected": r}) + "\n" for s, c, r in rows),
        )
    return summary
