"""The ``source_logps`` job: InfiFPO's per-source log-probs of every pair, from N source models.

"InfiFPO: Implicit Model Fusion via Preference Optimization in Large Language Models" (arXiv
2505.13878) fuses source models at the sequence level: its reference for a pair is built from each
source's length-normalised log-prob of y_w and y_l, so sources may have their own tokenizers. This
job computes them once, as the reference cache does for one model: for each model of
``config.sources.models`` (comma-separated presets, HF directories or training workdirs), every pair
of ``config.data.source`` is tokenized with that model's own tokenizer (its directory's
``tokenizer.json``, else ``config.data.tokenizer``) as TRL's DPOTrainer does and scored as the mean
completion-token log-prob (:mod:`alignjax.eval.scoring`, mode ``avg``). It writes
``<workdir>/pairs.jsonl``: each row of the source, in order, with ``source_logps = {"chosen": [..N],
"rejected": [..N]}`` (a row some source cannot tokenize is skipped as ``data.on_bad_row`` says and
counted in ``summary.json``), ready for ``loss=infifpo``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from alignjax import sharding, storage
from alignjax.data import DataStats, readers, resolve_tokenizer
from alignjax.data.pipeline import resolve_source, tokenize_all, tokenize_options
from alignjax.eval.scoring import as_pairs, load_model, score_examples

OUTPUT = "pairs.jsonl"
DERIVED = ("source_chosen_logps", "source_rejected_logps")  # validation's split of an input's source_logps


def source_models(config: Any) -> list[str]:
    """``config.sources.models``: paths separated by ``,`` or ``+``."""
    models = [m.strip() for m in str(config.sources.models).replace("+", ",").split(",") if m.strip()]
    if not models:
        raise ValueError("config.sources.models is empty: give the source models, comma-separated")
    return models


def model_tokenizer(path: str, default: str) -> str:
    """A source's own tokenizer: its directory's tokenizer.json, else ``default`` (a preset's)."""
    return path if os.path.isfile(os.path.join(path, "tokenizer.json")) else default


def source_scores(
    config: Any, path: str, records: Sequence[tuple[str, Mapping[str, Any]]], stats: DataStats, *, mesh: Any
) -> dict[str, tuple[float, float]]:
    """``where -> (mean token log-prob of y_w, of y_l)`` under the model at ``path``, for every
    record its tokenizer can tokenize."""
    tokenizer = resolve_tokenizer(model_tokenizer(path, config.data.tokenizer))
    model = load_model(
        path,
        mesh=mesh,
        rules=sharding.rules_from_config(config.get("rules") or None),
        dtype=config.model.dtype,
        compute_dtype=config.model.get("compute_dtype") or None,
    )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"config.sources.models: {path!r} has {model.config.vocab_size} embeddings but its tokenizer "
            f"{tokenizer.vocab_size} tokens"
        )
    examples, _ = tokenize_all(
        records,
        tokenizer,
        on_bad_row=config.data.on_bad_row,
        stats=stats,
        max_length=config.data.get("max_length") or None,
        **tokenize_options(config.data),
    )
    if not examples:
        raise ValueError(f"config.sources.models: {path!r} could tokenize no row of {config.data.source}")
    scores = score_examples(
        model,
        model.params,
        None,
        as_pairs(examples),
        mode="avg",
        mesh=mesh,
        batch_size=int(config.data.eval_batch_size),
        pad_id=tokenizer.pad_id,
        max_length=None,
    )
    return {
        ex.where: (float(c), float(r))
        for ex, c, r in zip(examples, scores["chosen_rewards"], scores["rejected_rewards"], strict=True)
    }


def with_sources(
    records: Sequence[tuple[str, Mapping[str, Any]]], per_model: Sequence[Mapping[str, tuple[float, float]]]
) -> list[dict[str, Any]]:
    """The records every source scored, each with its ``source_logps`` (one value per source)."""
    out = []
    for where, record in records:
        if all(where in scores for scores in per_model):
            pairs = [scores[where] for scores in per_model]
            row = {k: v for k, v in record.items() if k not in DERIVED}
            row["source_logps"] = {"chosen": [c for c, _ in pairs], "rejected": [r for _, r in pairs]}
            out.append(row)
    return out


def run_source_logps(config: Any, workdir: str) -> dict[str, Any]:
    """The job (module docstring). Returns the summary (also in summary.json)."""
    models = source_models(config)
    mesh = sharding.make_mesh(config.mesh)
    stats = DataStats()
    source = resolve_source(config.data.source)
    records = readers.load_records(source, "pairwise", config.data.on_bad_row, stats)
    per_model = [source_scores(config, path, records, stats, mesh=mesh) for path in models]
    rows = with_sources(records, per_model)
    summary = {"models": models, "rows_in": len(records), "rows_out": len(rows), **stats.summary()}
    if jax.process_index() == 0:
        root = storage.path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        storage.write_text(root / OUTPUT, "".join(json.dumps(r) + "\n" for r in rows))
        storage.write_text(root / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    return summary
