"""The annotation jobs ``source_logps``, ``semantic_distance`` and ``prompt_classifier``: per-row
columns computed once by a model (InfiFPO's source log-probs, Sem-DPO's semantic distances, BCO's
P(desirable | prompt); what each column is and how it is computed: :mod:`alignjax.eval.annotate`).

Each job reads ``config.data.source`` (pairs; unpaired rows for ``prompt_classifier``), adds its
column to every row it can compute it for and writes ``<workdir>/pairs.jsonl`` (each kept row, in
order; a row a model cannot take is skipped as ``data.on_bad_row`` says and counted) and
``summary.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from alignjax import sharding, storage
from alignjax.data import DataStats, readers
from alignjax.data.pipeline import resolve_source
from alignjax.data.tokenize import plain_text
from alignjax.eval.annotate import (
    DERIVED,
    desirable_probabilities,
    embedding_model_dir,
    sentence_embeddings,
    source_models,
    source_scores,
    with_sources,
)

OUTPUT = "pairs.jsonl"


def pair_records(config: Any, stats: DataStats) -> list[tuple[str, Mapping[str, Any]]]:
    """``(where, record)`` of every valid pair of ``config.data.source``."""
    return readers.load_records(resolve_source(config.data.source), "pairwise", config.data.on_bad_row, stats)


def write_rows(workdir: str, rows: Sequence[Mapping[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """``<workdir>/pairs.jsonl`` and ``summary.json`` (process 0); returns ``summary``."""
    if jax.process_index() == 0:
        root = storage.path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        storage.write_text(root / OUTPUT, "".join(json.dumps(r) + "\n" for r in rows))
        storage.write_json(root / "summary.json", summary)
    return summary


def run_source_logps(config: Any, workdir: str) -> dict[str, Any]:
    """The ``source_logps`` job (:mod:`alignjax.eval.annotate`); returns the summary."""
    models = source_models(config)
    mesh = sharding.make_mesh(config.mesh)
    stats = DataStats()
    records = pair_records(config, stats)
    per_model = [source_scores(config, path, records, stats, mesh=mesh) for path in models]
    rows = with_sources(records, per_model)
    stats.rows_kept = len(rows)
    return write_rows(workdir, rows, {"models": models, "rows_in": len(records), "rows_out": len(rows),
                                  **stats.summary()})


def run_semantic_distance(config: Any, workdir: str) -> dict[str, Any]:
    """The ``semantic_distance`` job (:mod:`alignjax.eval.annotate`); returns the summary."""
    model_dir = embedding_model_dir(config.embed.model)
    stats = DataStats()
    records = pair_records(config, stats)
    if not records:
        raise ValueError(f"config.data.source={config.data.source}: no pairs to embed")
    if int(config.embed.get("max_rows", 0)):
        records = records[: int(config.embed.max_rows)]
    prompt_texts = [plain_text(r.get("prompt", r.get("chosen_prompt", ""))) for _, r in records]
    prompts = sentence_embeddings(model_dir, prompt_texts)
    chosen = sentence_embeddings(model_dir, [plain_text(r["chosen"]) for _, r in records])
    distance = np.clip(1.0 - np.sum(prompts * chosen, axis=-1), 0.0, 2.0)
    rows = [dict({k: v for k, v in r.items() if k not in DERIVED}, semantic_distance=float(d))
            for (_, r), d in zip(records, distance, strict=True)]
    stats.rows_kept = len(rows)
    return write_rows(workdir, rows, {"model": model_dir, "rows_in": len(records), "rows_out": len(rows),
                                  "semantic_distance/mean": float(distance.mean()), **stats.summary()})


def run_prompt_classifier(config: Any, workdir: str) -> dict[str, Any]:
    """The ``prompt_classifier`` job (:mod:`alignjax.eval.annotate`); returns the summary."""
    model_dir = embedding_model_dir(config.embed.model)
    stats = DataStats()
    source = resolve_source(config.data.source)
    records = readers.load_records(source, "unpaired", config.data.on_bad_row, stats)
    if not records:
        raise ValueError(f"config.data.source={config.data.source}: no unpaired rows to classify")
    if int(config.embed.get("max_rows", 0)):
        records = records[: int(config.embed.max_rows)]
    embeddings = sentence_embeddings(model_dir, [plain_text(r["prompt"]) for _, r in records])
    labels = np.array([bool(r["label"]) for _, r in records])
    prob, clf = desirable_probabilities(
        embeddings, labels, sample_size=int(config.embed.sample_size), seed=int(config.seed)
    )
    rows = [dict(r, prompt_desirable_prob=float(p)) for (_, r), p in zip(records, prob, strict=True)]
    stats.rows_kept = len(rows)
    accuracy = {
        f"classifier/accuracy_{name}": float(clf.score(embeddings[labels == side], labels[labels == side]))
        for name, side in (("desirable", True), ("undesirable", False))
    }
    return write_rows(workdir, rows, {"model": model_dir, "rows_in": len(records), "rows_out": len(rows),
                                  **accuracy, **stats.summary()})


def run(config: Any, workdir: str) -> dict[str, Any]:
    """The annotation job ``config.job`` names; returns its summary (also in summary.json)."""
    jobs = {
        "source_logps": run_source_logps,
        "semantic_distance": run_semantic_distance,
        "prompt_classifier": run_prompt_classifier,
    }
    if config.job not in jobs:
        raise ValueError(f"config.job={config.job!r}: the annotation jobs are {sorted(jobs)}")
    return jobs[config.job](config, workdir)
