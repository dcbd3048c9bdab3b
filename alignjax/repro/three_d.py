"""Reproduction: likelihood collapse under DPO and the separate-beta and NLL remedies.

Claim ("3D-Properties: Identifying Challenges in DPO and Charting a Path Forward", arXiv 2406.07327):
under DPO the rejected responses' likelihood falls fast, and the chosen responses' likelihood falls too
(the gradient on the rejected term dominates); a smaller beta on the rejected term
(-ls(beta_w u_w - beta_l u_l)) slows the rejected collapse, and adding lambda NLL(y_w) keeps the chosen
likelihood up.

    python -m alignjax.main --config=experiments/repro_3d.py --workdir=workdirs/repro_3d
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from alignjax.repro import common


def likelihood_row(policy: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean change in per-token log-prob (policy - reference) of held-out chosen / rejected responses."""
    n_w = np.maximum(policy["chosen_lengths"], 1)
    n_l = np.maximum(policy["rejected_lengths"], 1)
    return {
        "delta_chosen": float(np.mean((policy["chosen_logps"] - ref["chosen_logps"]) / n_w)),
        "delta_rejected": float(np.mean((policy["rejected_logps"] - ref["rejected_logps"]) / n_l)),
        "ranking_accuracy": float(np.mean(policy["chosen_logps"] >= policy["rejected_logps"])),
    }


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Per seed: one SFT model, then each loss in ``config.repro.losses`` from it; held-out log-prob
    changes."""
    p = common.repro_params(config, "repro_three_d")
    rows: dict[str, dict[int, dict[str, float]]] = {name: {} for name in p.losses}
    for seed in p.seeds:
        c = common.small_config(
            seed=seed,
            sft_steps=p.sft_steps,
            pref_steps=p.pref_steps,
            batch_size=p.batch_size,
            learning_rate=p.learning_rate,
        )
        wd = os.path.join(workdir, f"seed{seed}")
        model, ref_params = common.run_sft(c, wd)
        ref = common.pair_logps(model, ref_params, c, num_pairs=p.num_pairs)
        np.savez(os.path.join(wd, "ref.npz"), **ref)
        for name, loss in p.losses.items():
            out = common.run_preference(c, wd, model, ref_params, loss=loss.to_dict(), name=name)
            pol = common.pair_logps(model, out.params, c, num_pairs=p.num_pairs)
            np.savez(os.path.join(wd, f"{name}.npz"), **pol)
            rows[name][seed] = likelihood_row(pol, ref)
    seeds = list(p.seeds)
    header = ["loss", "Δ log p(chosen)/token", "Δ log p(rejected)/token", "ranking acc.", "per seed (Δc, Δr)"]
    table = []
    for name, per_seed in rows.items():
        col = {k: [per_seed[s][k] for s in seeds] for k in per_seed[seeds[0]]}
        each = "; ".join(f"{c:+.3f}, {r:+.3f}" for c, r in zip(col["delta_chosen"], col["delta_rejected"]))
        table.append(
            [
                f"`{name}`",
                common.fmt(col["delta_chosen"]),
                common.fmt(col["delta_rejected"]),
                common.fmt(col["ranking_accuracy"]),
                each,
            ]
        )
    markdown = common.markdown_table(header, table)
    common.write_table(workdir, {"rows": rows, "config": p.to_dict()}, markdown)
    return {"rows": rows, "markdown": markdown}
