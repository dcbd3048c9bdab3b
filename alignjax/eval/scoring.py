"""The scoring job: implicit rewards of a DPO policy on preference pairs, RewardBench's protocol.

``python -m alignjax.main --config=experiments/score.py --workdir=DIR`` loads a policy (a preset or an
HF directory) and, in ``ref`` mode, a reference; tokenizes every pair of ``config.data.source``
(strings or chat messages; a ``subset`` column groups rows as RewardBench does), computes each
completion's implicit reward (:func:`alignjax.eval.rewardbench.implicit_rewards`) and writes
``summary.json``: pair accuracy (ties wrong), mean margin, per-subset and section scores, ranking
accuracy, and the data statistics. Nothing is dropped: the last partial batch is padded with
copies that are scored and discarded, and skipped rows (``data.on_bad_row=skip``) are counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from alignjax import logprobs, sharding
from alignjax.data import DataStats, batching, readers, resolve_tokenizer
from alignjax.data.pipeline import resolve_source, tokenize_all
from alignjax.data.tokenize import TokenizedExample
from alignjax.eval import ranking, rewardbench


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


def score_examples(
    model: Any,
    params: Any,
    ref_params: Any,
    examples: Sequence[TokenizedExample],
    *,
    mode: str,
    mesh: Any,
    batch_size: int,
    pad_id: int,
    max_length: int | None,
) -> dict[str, np.ndarray]:
    """Rewards and log-probs of every pair, in order: ``chosen_rewards``, ``rejected_rewards``, ...

    Batches have one fixed shape (``batch_size`` pairs padded to ``max_length``, or to the longest
    pair) so the function compiles once.
    """
    if not examples:
        raise ValueError("no pairs to score (every row was skipped or the source is empty)")
    longest = max(len(ex.prompt) + max(len(c) for c in ex.completions) for ex in examples)
    length = max_length or longest
    reward_fn = make_reward_fn(model, mode=mode, num_pairs=batch_size, with_reference=ref_params is not None)
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("rewards", "logps", "ref_logps")}
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)  # fixed shape; the copies are discarded below
        host = batching.make_batch(chunk, "padded", pad_id=pad_id, buckets=(length,))
        host = {k: host[k] for k in ("input_ids", "positions", "segment_ids", "loss_mask", "example_ids")}
        outputs = reward_fn(params, ref_params, sharding.global_batch(mesh, host))
        for key, value in zip(columns, outputs, strict=True):
            chosen, rejected = np.split(np.asarray(value), 2)
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


def run_score(config: Any, workdir: str) -> dict[str, Any]:
    """The ``score`` job: see the module docstring. Returns the summary (also in summary.json)."""
    from alignjax import models

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
    dtypes = dict(dtype=config.model.dtype, compute_dtype=config.model.get("compute_dtype") or None)
    policy = models.from_pretrained(config.model.path, **dtypes, mesh=mesh, rules=rules)
    reference = (
        models.from_pretrained(config.reference.path, **dtypes, mesh=mesh, rules=rules)
        if mode == "ref"
        else None
    )
    if tokenizer.vocab_size > policy.config.vocab_size:
        raise ValueError(
            f"tokenizer {config.data.tokenizer!r} has {tokenizer.vocab_size} tokens but model "
            f"{config.model.path!r} only {policy.config.vocab_size} "
            "(config.data.tokenizer / config.model.path)"
        )
    stats = DataStats()
    max_length = config.data.get("max_length") or None
    examples, records = load_pairs(
        config.data.source, tokenizer, max_length=max_length, on_bad_row=config.data.on_bad_row, stats=stats
    )
    batch_size = int(config.data.eval_batch_size)
    scores = score_examples(
        policy,
        policy.params,
        None if reference is None else reference.params,
        examples,
        mode=mode,
        mesh=mesh,
        batch_size=batch_size,
        pad_id=tokenizer.pad_id,
        max_length=max_length,
    )
    summary = summarize(scores, subset_names(records), with_reference=reference is not None)
    summary.update(
        {
            "mode": mode,
            "model": config.model.path,
            "reference": config.reference.path if reference is not None else None,
            "source": str(config.data.source),
        }
    )
    summary.update(stats.summary())
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
    return summary
