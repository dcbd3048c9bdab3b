"""The ``reward_model`` job (``experiments/reward_model.py``): train a reward model, score it, export it.

``config.reward.objective`` picks the training (:mod:`alignjax.reward.train`: ``bt``, ``gpm``,
``pal``; ``secrets``: the whole Secrets-II pipeline, :mod:`alignjax.reward.secrets`, its final model
in ``<workdir>/final``); the final model then scores ``config.reward.eval_source`` in RewardBench's
format (:func:`alignjax.reward.evaluate.score_file`, ``rewardbench.json`` beside its checkpoints)
and, with ``config.reward.export_dir``, is exported as an HF sequence classifier
(:func:`alignjax.reward.export.save_classifier`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from alignjax.data import resolve_tokenizer
from alignjax.reward.evaluate import score_file
from alignjax.reward.export import save_classifier
from alignjax.reward.secrets import run_secrets
from alignjax.reward.train import check_config, train_reward_model
from alignjax.train.result import TrainResult


def run(config: Any, workdir: str) -> dict[str, Any]:
    """The ``reward_model`` job: :func:`train_and_score`'s summary."""
    return train_and_score(config, workdir).summary


def train_and_score(config: Any, workdir: str) -> TrainResult:
    """Trains (the Secrets-II pipeline for ``objective=secrets``), then scores
    ``config.reward.eval_source`` (RewardBench format) and exports the HF classifier if asked; returns
    the final model's result, its summary with ``rewardbench`` / ``export_dir`` added (a stopped run's
    as the loop returned it)."""
    check_config(config)
    if config.reward.objective == "secrets":
        result = run_secrets(config, workdir)
        final_dir = os.path.join(workdir, "final")
    else:
        result = train_reward_model(config, workdir)
        final_dir = workdir
    if result.stopped:
        return result
    model, params, summary = result.model, result.params, dict(result.summary)
    if config.reward.eval_source:
        report = score_file(config, model, params, config.reward.eval_source)
        summary["rewardbench"] = report
        if jax.process_index() == 0:
            with open(os.path.join(final_dir, "rewardbench.json"), "w") as f:
                json.dump(report, f, indent=2, sort_keys=True)
    if config.reward.export_dir:
        save_classifier(
            model,
            params,
            config.reward.export_dir,
            pad_token_id=resolve_tokenizer(config.data.tokenizer).pad_id,
        )
        summary["export_dir"] = config.reward.export_dir
    return dataclasses.replace(result, summary=summary)
