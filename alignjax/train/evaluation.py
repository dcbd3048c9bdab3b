"""Held-out evaluation of a preference/SFT run: ranking accuracy, reward accuracy, the idealised
ranking bound (pairs) and the chosen completions' mean NLL, over every process's rows."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from alignjax.eval import ranking


def evaluate(
    eval_fn: Any, params: Any, ref_params: Any, batches: list[dict[str, jax.Array]], beta: float
) -> dict[str, float]:
    """Held-out metrics: ranking accuracy, reward accuracy and the idealised bound (pairs), mean NLL."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        for k, v in eval_fn(params, ref_params, batch).items():
            parts.setdefault(k, []).append(
                np.asarray(multihost_utils.process_allgather(v, tiled=True))
            )
    vals = {k: np.concatenate(v) for k, v in parts.items()}
    out = {"eval/nll_chosen": float(np.mean(-vals["chosen_logps"] / np.maximum(vals["chosen_lengths"], 1)))}
    if "rejected_logps" in vals:
        out["eval/ranking_accuracy"] = float(
            ranking.ranking_accuracy(vals["chosen_logps"], vals["rejected_logps"])
        )
        if "ref_chosen_logps" in vals:
            report = ranking.ranking_report(
                vals["chosen_logps"],
                vals["rejected_logps"],
                vals["ref_chosen_logps"],
                vals["ref_rejected_logps"],
            )
            out.update(report)
            out[f"eval/idealized_ranking_accuracy/beta={beta:g}"] = float(
                ranking.idealized_ranking_accuracy(
                    vals["ref_chosen_logps"], vals["ref_rejected_logps"], beta=beta
                )
            )
        else:
            out["eval/reward_accuracy"] = float(
                ranking.reward_accuracy(vals["chosen_logps"], vals["rejected_logps"])
            )
    return out
