"""RewardBench-format evaluation of trained reward models (value, PAL and GPM heads).

"RewardBench: Evaluating Reward Models for Language Modeling" (Lambert et al., arXiv:2403.13787):
rows (``prompt``, ``chosen``, ``rejected``, ``subset``); a pair is correct when the chosen side wins
strictly (ties count wrong); per-subset accuracies and example-count-weighted sections
(:mod:`alignjax.eval.rewardbench`). Classifier heads (value, PAL) score each response alone; GPM
scores a *pair*: a pair is correct when s(chosen > rejected) = <R v_c, v_r> > 0, and the reported
"rewards" are s and -s (GPM has no per-response reward).

Implicit rewards of DPO policies are the scoring job's (:mod:`alignjax.eval.scoring`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from alignjax import sharding
from alignjax.data import DataStats, batching, resolve_tokenizer
from alignjax.data.tokenize import TokenizedExample
from alignjax.eval import rewardbench
from alignjax.eval.scoring import load_pairs, subset_names
from alignjax.reward.model import RewardModel
from alignjax.reward.train import RewardSpec, pair_outputs

_KEEP = ("input_ids", "positions", "segment_ids", "loss_mask", "example_ids", "user_id")


def score_pairs(
    model: RewardModel,
    params: Any,
    examples: Sequence[TokenizedExample],
    *,
    mesh: Any,
    batch_size: int,
    pad_id: int,
    max_length: int | None = None,
) -> dict[str, np.ndarray]:
    """Every pair's ``scores`` [N] (> 0: chosen wins), ``chosen_rewards`` / ``rejected_rewards`` [N]
    and, for value heads, each head's rewards ``chosen_all`` / ``rejected_all`` [N, K].

    One fixed batch shape (``batch_size`` pairs, padded to ``max_length`` or the longest pair; the last
    partial batch is filled with copies that are scored and dropped), so it compiles once.
    """
    if not examples:
        raise ValueError("no pairs to score (every row was skipped or the source is empty)")
    longest = max(len(ex.prompt) + max(len(c) for c in ex.completions) for ex in examples)
    length = max(max_length or 0, longest)
    spec = RewardSpec(objective="eval", loss="", hyperparameters=(), batch_size=batch_size)
    keys = ["scores", "chosen_rewards", "rejected_rewards"]
    if model.head_config.kind == "value":
        keys += ["chosen_all", "rejected_all"]
    fn = jax.jit(lambda p, batch: {k: pair_outputs(model, p, batch, spec)[k] for k in keys})
    columns: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        local = sharding.process_share(chunk)  # every process holds all pairs and scores its share
        host = batching.make_batch(local, "padded", pad_id=pad_id, buckets=(length,))
        host = sharding.global_sequence_ids({k: host[k] for k in _KEEP if k in host}, examples=len(local))
        out = fn(params, sharding.global_batch(mesh, host))
        for k in keys:
            columns[k].append(np.asarray(multihost_utils.process_allgather(out[k], tiled=True))[:real])
    return {k: np.concatenate(v) for k, v in columns.items()}


def rewardbench_report(scores: dict[str, np.ndarray], subsets: Sequence[str]) -> dict[str, Any]:
    """Accuracy (ties wrong), per-subset accuracy/count and section scores of scored pairs."""
    s = scores["scores"]
    # Correct iff score > 0; passing (s, 0) keeps RewardBench's strict ">" (a tie is wrong).
    accuracies, counts = rewardbench.subset_accuracies(subsets, s, np.zeros_like(s))
    report: dict[str, Any] = {
        "num_pairs": int(len(s)),
        "accuracy": float(np.mean(s > 0)),
        "rewards/chosen": float(np.mean(scores["chosen_rewards"])),
        "rewards/rejected": float(np.mean(scores["rejected_rewards"])),
        "rewards/margins": float(np.mean(scores["chosen_rewards"] - scores["rejected_rewards"])),
        "subsets": {name: {"accuracy": accuracies[name], "count": counts[name]} for name in accuracies},
    }
    if set(subsets) != {"all"}:
        report["sections"] = rewardbench.section_scores(accuracies, counts)
    return report


def score_file(config: Any, model: RewardModel, params: Any, source: Any) -> dict[str, Any]:
    """Loads ``source`` (RewardBench-format JSONL/Parquet or records), scores it, returns the report
    (plus the data statistics: rows read, kept, skipped by reason)."""
    tokenizer = resolve_tokenizer(config.data.tokenizer)
    stats = DataStats()
    max_length = config.data.get("max_length") or None
    examples, records = load_pairs(
        source, tokenizer, max_length=max_length, on_bad_row=config.data.on_bad_row, stats=stats
    )
    mesh = model.mesh if model.mesh is not None else sharding.make_mesh(dict(config.mesh))
    scores = score_pairs(
        model,
        params,
        examples,
        mesh=mesh,
        batch_size=int(config.data.eval_batch_size),
        pad_id=tokenizer.pad_id,
        max_length=max_length,
    )
    report = rewardbench_report(scores, subset_names(records))
    report.update(stats.summary())
    report["source"] = str(source)
    return report
