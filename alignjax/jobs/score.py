"""The ``score`` job: implicit rewards of a DPO policy on preference pairs, RewardBench's protocol.

``python -m alignjax.main --config=experiments/score.py --workdir=DIR`` loads a policy (a preset, an
HF directory, or a training workdir ``DIR[@STEP]``: :func:`alignjax.export.load_run`) and, in
``ref`` mode, a reference; tokenizes every pair of ``config.data.source`` (a ``subset`` column
groups rows as RewardBench does) by ``config.score.tokenization``: ``"rewardbench"``, RewardBench's
DPO scorer (chat template, BOS/EOS, truncation: :mod:`alignjax.eval.rewardbench`), or ``"trl"``,
the training data pipeline's (TRL's DPOTrainer; ``data.max_length`` etc.); computes each
completion's implicit reward (:func:`alignjax.eval.scoring.score_examples`) and writes
``summary.json``: pair accuracy (ties wrong), mean margin, per-subset and RewardBench section
scores, ranking accuracy and the data statistics, and ``scores.jsonl``: each pair's subset and
rewards, in input order (RewardBench's ``scores_chosen``/``scores_rejected``). Nothing is dropped: the last
partial batch is padded with copies that are scored and discarded, and skipped rows
(``data.on_bad_row=skip``) are counted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax

from alignjax import sharding, storage
from alignjax.data import DataStats, readers, resolve_tokenizer
from alignjax.data.pipeline import resolve_source, tokenize_all, tokenize_options
from alignjax.eval import rewardbench
from alignjax.eval.scoring import as_pairs, load_model, score_examples, subset_names, summarize

TOKENIZATIONS = ("rewardbench", "trl")


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


def run(config: Any, workdir: str) -> dict[str, Any]:
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
    reference = None
    if mode == "ref":
        # A preset or HF reference computes in the policy's dtypes (a workdir's may differ from
        # config.model's), so that equal weights give rewards of exactly 0.
        like_policy = dict(load, dtype=policy.config.param_dtype, compute_dtype=policy.config.dtype)
        reference = load_model(config.reference.path, **like_policy)
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
        reference,
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
