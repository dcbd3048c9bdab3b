"""The Secrets-of-RLHF-II pipeline: ensemble -> preference strength -> flip / smooth / margin -> retrain.

"Secrets of RLHF in Large Language Models Part II: Reward Modeling" (Wang et al., arXiv:2401.06080).

1. ``<workdir>/ensemble``: an ensemble of M = ``config.reward.secrets.ensemble_size`` Bradley-Terry
   reward models, ``ensemble_steps`` steps. ``config.reward.secrets.ensemble``: ``"models"`` trains M
   independent reward models (seeds ``seed + 1 ... seed + M``: their own initialisation and data
   order, as the paper's ensemble of separately trained models), in ``ensemble/member_<m>``;
   ``"heads"`` (cheaper) trains M value heads on one shared decoder (the mean of their losses),
   whose disagreement is smaller because they share every feature.
2. Every training pair's strength: d_m = r_m(y_w) - r_m(y_l), mean mu and std sigma over the members
   (:func:`alignjax.losses.reward.preference_strength`). ``<workdir>/strength.jsonl`` is the training
   set with ``margin`` = mu and ``strength_std`` = sigma per row; the dataset-level thresholds
   (:func:`alignjax.losses.reward.strength_thresholds`: lowest ``flip_fraction`` flipped where mu < 0,
   next ``smooth_fraction`` label-smoothed) go to ``<workdir>/strength.json``.
3. ``<workdir>/final``: ``secrets_rm`` (flip, smoothing, adaptive margin mu) on ``strength.jsonl``
   for ``config.train.num_steps`` steps.

Rerunning with the same workdir resumes whichever stage was interrupted.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from alignjax import sharding
from alignjax.data import DataStats, resolve_tokenizer
from alignjax.eval.scoring import load_pairs
from alignjax.losses.reward import preference_strength, strength_thresholds
from alignjax.reward.evaluate import score_pairs
from alignjax.reward.train import train_reward_model
from alignjax.train.result import TrainResult

ENSEMBLES = ("models", "heads")


def ensemble_config(config: Any, member: int | None = None) -> Any:
    """Stage 1's config: all M heads on one decoder (``member=None``), or ensemble member ``member``
    (0-based) of the ``"models"`` ensemble: one value head, seed ``config.seed + member + 1``."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.reward.objective = "bt"
        c.reward.num_heads = int(config.reward.secrets.ensemble_size) if member is None else 1
        if member is not None:
            c.seed = int(config.seed) + member + 1
        c.reward.eval_source = ""
        c.reward.export_dir = ""
        c.loss = type(c.loss)(
            dict(name="bradley_terry", nll_weight=0.0, label_smoothing=0.0, center_rewards_coefficient=0.0)
        )
        c.train.num_steps = int(config.reward.secrets.ensemble_steps)
    return c


def strengths(
    config: Any, members: list[tuple[Any, Any]]
) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """(kept training records, mu [N], sigma [N]) on ``config.data.source`` from the ensemble:
    ``members`` is a list of (reward model, params), each contributing every value head it has."""
    tokenizer = resolve_tokenizer(config.data.tokenizer)
    max_length = config.data.get("max_length") or None
    on_bad_row, stats = config.data.on_bad_row, DataStats()
    examples, records = load_pairs(
        config.data.source, tokenizer, max_length=max_length, on_bad_row=on_bad_row, stats=stats
    )
    diffs = []
    for model, params in members:
        mesh = model.mesh if model.mesh is not None else sharding.make_mesh(dict(config.mesh))
        scores = score_pairs(
            model,
            params,
            examples,
            mesh=mesh,
            batch_size=int(config.reward.secrets.score_batch_size),
            pad_id=tokenizer.pad_id,
            max_length=max_length,
        )
        diffs.append((scores["chosen_all"] - scores["rejected_all"]).T)  # [heads, N]
    mu, sd = preference_strength(np.concatenate(diffs))  # over all M members
    return records, np.asarray(mu), np.asarray(sd)


def write_strength_file(records: list[dict[str, Any]], mu: np.ndarray, sd: np.ndarray, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for rec, m, s in zip(records, mu, sd, strict=True):
            row = {
                k: v
                for k, v in rec.items()
                if k in ("prompt", "chosen", "rejected", "weight", "user_id", "subset")
            }
            row.update(margin=float(m), strength_std=float(s))
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def run_secrets(config: Any, workdir: str) -> TrainResult:
    """Runs the three stages (see the module docstring); returns the final stage's result, its summary
    with ``secrets/*`` figures added (thresholds, flipped and smoothed counts, strength statistics)."""
    os.makedirs(workdir, exist_ok=True)
    kind = config.reward.secrets.get("ensemble", "models")
    if kind not in ENSEMBLES:
        raise ValueError(f"config.reward.secrets.ensemble={kind!r}; choose one of {list(ENSEMBLES)}")
    if kind == "heads":
        runs = [train_reward_model(ensemble_config(config), os.path.join(workdir, "ensemble"))]
    else:
        runs = [
            train_reward_model(ensemble_config(config, m), os.path.join(workdir, "ensemble", f"member_{m}"))
            for m in range(int(config.reward.secrets.ensemble_size))
        ]
    records, mu, sd = strengths(config, [(run.model, run.params) for run in runs])
    s = config.reward.secrets
    flip_below, smooth_below = strength_thresholds(
        mu, flip_fraction=float(s.flip_fraction), smooth_fraction=float(s.smooth_fraction)
    )
    path = os.path.join(workdir, "strength.jsonl")
    info = {
        "secrets/flip_below": flip_below,
        "secrets/smooth_below": smooth_below,
        "secrets/flipped": int(np.sum(mu < min(flip_below, 0.0))),
        "secrets/smoothed": int(np.sum((mu >= min(flip_below, 0.0)) & (mu < smooth_below))),
        "secrets/strength_mean": float(np.mean(mu)),
        "secrets/strength_std_mean": float(np.mean(sd)),
        "secrets/ensemble_train_accuracy": float(np.mean(mu > 0)),
    }
    if jax.process_index() == 0:
        write_strength_file(records, mu, sd, path)
        with open(os.path.join(workdir, "strength.json"), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
    final = copy.deepcopy(config)
    with final.unlocked():
        final.data.source = path
        final.loss.flip_below = flip_below
        final.loss.smooth_below = smooth_below
    result = train_reward_model(final, os.path.join(workdir, "final"))
    return dataclasses.replace(result, summary={**result.summary, **info})
