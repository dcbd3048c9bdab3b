"""Reproduction: MCTS step-level DPO vs instance-level DPO vs the SFT model on multi-step arithmetic.

Claim ("Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning", Xie et al.,
arXiv:2405.00451): iterative DPO on step-level pairs collected by MCTS with the policy itself improves
reasoning accuracy over the SFT model and over instance-level DPO (pairs of whole sampled solutions)
at the same sample budget.

``config`` is an ``mcts_dpo`` job's config (``experiments/repro_mcts_dpo.py``: that of
``experiments/mcts_dpo.py``) and ``config.mcts_dpo.seeds`` the seeds. Per seed (``config.seed``: model
init, data order, search and sampling): one SFT run (``seed_<s>/sft``), then the ``mcts_dpo`` job
(:mod:`alignjax.jobs.mcts_dpo`) twice from it: ``method=mcts`` in ``seed_<s>/mcts``, and
``method=instance`` in ``seed_<s>/instance`` at the MCTS run's per-prompt token budget
(``budget_from``). Every other value (rounds, prompts, search, both stages) is the config's, the same
for every seed and both methods. The table: held-out greedy accuracy of SFT, instance-level DPO and
MCTS-DPO per seed, mean ± std over seeds, pairs and generated tokens per round, in
``<workdir>/table.json`` and ``table.md``. Finished runs and rounds are reused on a rerun (each job
resumes in its own workdir).

The seeds run one after another, in this process (no process per seed in parallel).

    python -m alignjax.main --config=experiments/repro_mcts_dpo.py --workdir=workdirs/mcts_repro
"""

from __future__ import annotations

import os
import time
from typing import Any

from alignjax.jobs import mcts_dpo
from alignjax.repro import common

METHODS = ("sft", "instance", "mcts")
LABELS = {"sft": "SFT", "instance": "instance-level DPO", "mcts": "MCTS step-level DPO"}


def method_config(config: Any, seed: int, method: str, seed_dir: str) -> Any:
    """The ``mcts_dpo`` job's config of one seed and method: the SFT stage in ``<seed_dir>/sft``
    (shared by both methods); ``instance`` spends the per-prompt budget of ``<seed_dir>/mcts``."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.job = "mcts_dpo"
        c.seed = seed
        c.mcts_dpo.method = method
        c.mcts_dpo.sft_dir = os.path.join(seed_dir, "sft")
        c.mcts_dpo.budget_from = os.path.join(seed_dir, "mcts") if method == "instance" else ""
    return c


def seed_row(seed: int, out: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One seed's row from the two jobs' summaries."""
    return {
        "seed": seed,
        "sft": out["mcts"]["task_accuracy/sft"],
        "instance": out["instance"]["task_accuracy/final"],
        "mcts": out["mcts"]["task_accuracy/final"],
        "instance_rounds": out["instance"]["task_accuracy/rounds"],
        "mcts_rounds": out["mcts"]["task_accuracy/rounds"],
        "pairs/instance": out["instance"]["num_pairs/rounds"],
        "pairs/mcts": out["mcts"]["num_pairs/rounds"],
        "tokens/instance": out["instance"]["generated_tokens/rounds"],
        "tokens/mcts": out["mcts"]["generated_tokens/rounds"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of docs/reproductions.md: accuracy per seed, pairs and tokens per round,
    mean ± std over seeds."""
    body = [
        [
            r["seed"],
            *(f"{r[m]:.3f}" for m in METHODS),
            f"{r['pairs/instance']} / {r['pairs/mcts']}",
            f"{r['tokens/instance']} / {r['tokens/mcts']}",
        ]
        for r in rows
    ]
    body.append(["mean ± std", *(common.fmt([r[m] for r in rows]) for m in METHODS), "", ""])
    header = ["seed", *(LABELS[m] for m in METHODS), "pairs inst/MCTS", "tokens inst/MCTS"]
    return common.markdown_table(header, body)


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Every seed, then the table (``table.json``, ``table.md``); returns the rows, mean and std per
    method, the number of seeds ordered SFT < instance < MCTS, the table and the wall time."""
    t0 = time.time()
    rows = []
    for seed in config.mcts_dpo.seeds:
        seed_dir = os.path.join(workdir, f"seed_{seed}")
        out = {}
        for method in ("mcts", "instance"):  # instance spends the finished MCTS run's budget
            c = method_config(config, int(seed), method, seed_dir)
            out[method] = mcts_dpo.run(c, os.path.join(seed_dir, method))
        rows.append(seed_row(int(seed), out))
    stats = {m: common.mean_spread([r[m] for r in rows]) for m in METHODS}
    ordered = sum(r["sft"] < r["instance"] < r["mcts"] for r in rows)
    markdown = table(rows)
    wall = time.time() - t0
    result = {"rows": rows, "mean_std": stats, "seeds_with_ordering": ordered, "wall_s": wall}
    common.write_table(workdir, {**result, "config": config.to_dict()}, markdown)
    print(markdown, flush=True)
    print(f"SFT < instance < MCTS on {ordered}/{len(rows)} seeds; {wall:.0f} s", flush=True)
    return {**result, "markdown": markdown}
