"""Reproduction: ranking accuracy after DPO vs its idealised bound, and how few misranked pairs DPO flips.

Claim ("Preference Learning Algorithms Do Not Learn Preference Rankings", Chen et al., arXiv 2405.19534):
the ranking accuracy R = mean 1[pi(y_w) >= pi(y_l)] of a DPO policy stays far below the idealised
accuracy R* of the optimal DPO policy (Theorem 3.1), and DPO rarely flips a pair that the reference
ranks wrongly (Theorem 4.1: the pair is ranked correctly iff L_DPO <= -ls(beta c)).

    python -m alignjax.main --config=experiments/repro_ranking.py --workdir=workdirs/repro_ranking
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

import alignjax.losses as losses
from alignjax.eval import ranking
from alignjax.repro import common


def pair_row(arrays: Mapping[str, np.ndarray], beta: float) -> dict[str, float]:
    """One seed's row from held-out per-pair log-probs (policy and reference, [N] each)."""
    a = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    ranked = a["chosen_logps"] >= a["rejected_logps"]
    loss = np.asarray(
        losses.get("dpo")(
            a["chosen_logps"], a["rejected_logps"], a["ref_chosen_logps"], a["ref_rejected_logps"], beta=beta
        )
    )
    rc, rl = a["ref_chosen_logps"], a["ref_rejected_logps"]
    threshold = np.asarray(ranking.dpo_ranking_threshold(rc, rl, beta=beta))
    clear = np.abs(loss - threshold) > 1e-5  # float32 ties aside
    return {
        "ref_ranking_accuracy": float(ranking.ranking_accuracy(rc, rl)),
        "ranking_accuracy": float(np.mean(ranked)),
        "idealized_ranking_accuracy": float(
            ranking.idealized_ranking_accuracy(a["ref_chosen_logps"], a["ref_rejected_logps"], beta=beta)
        ),
        "reward_accuracy": float(
            ranking.reward_accuracy(
                a["chosen_logps"], a["rejected_logps"], a["ref_chosen_logps"], a["ref_rejected_logps"]
            )
        ),
        "misranked_by_ref": float(np.mean(a["ref_chosen_logps"] < a["ref_rejected_logps"])),
        "flipped_fraction": float(
            ranking.flipped_fraction(
                a["chosen_logps"], a["rejected_logps"], a["ref_chosen_logps"], a["ref_rejected_logps"]
            )
        ),
        "theorem_4_1_agreement": float(np.mean((loss <= threshold)[clear] == ranked[clear])),
    }


COLUMNS = (
    "ref_ranking_accuracy",
    "ranking_accuracy",
    "idealized_ranking_accuracy",
    "reward_accuracy",
    "misranked_by_ref",
    "flipped_fraction",
    "theorem_4_1_agreement",
)


def run(config: Any, workdir: str) -> dict[str, Any]:
    """SFT -> DPO per seed; per-pair log-probs of ``config.repro.num_pairs`` held-out pairs; the table."""
    p = common.repro_params(config, "repro_ranking")
    rows: dict[int, dict[str, float]] = {}
    for seed in p.seeds:
        c = common.small_config(
            seed=seed,
            sft_steps=p.sft_steps,
            pref_steps=p.pref_steps,
            batch_size=p.batch_size,
            learning_rate=p.learning_rate,
            loss=dict(name="sigmoid", beta=p.beta, nll_weight=0.0),
        )
        wd = os.path.join(workdir, f"seed{seed}")
        model, ref_params = common.run_sft(c, wd)
        out = common.run_preference(c, wd, model, ref_params)
        pol = common.pair_logps(model, out.params, c, num_pairs=p.num_pairs)
        ref = common.pair_logps(model, ref_params, c, num_pairs=p.num_pairs)
        arrays = dict(
            chosen_logps=pol["chosen_logps"],
            rejected_logps=pol["rejected_logps"],
            ref_chosen_logps=ref["chosen_logps"],
            ref_rejected_logps=ref["rejected_logps"],
        )
        np.savez(os.path.join(wd, "pairs.npz"), **arrays)
        rows[seed] = pair_row(arrays, p.beta)
    header = ["metric", *(f"seed {s}" for s in rows), "mean ± sd"]
    table = [
        [k, *(f"{rows[s][k]:.3f}" for s in rows), common.fmt([rows[s][k] for s in rows])] for k in COLUMNS
    ]
    markdown = common.markdown_table(header, table)
    common.write_table(workdir, {"beta": p.beta, "rows": rows, "config": p.to_dict()}, markdown)
    return {"rows": rows, "markdown": markdown}
