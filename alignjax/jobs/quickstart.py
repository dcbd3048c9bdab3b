"""The ``quickstart`` job, the embedded default (``make demo``): SFT on the arithmetic task, then DPO
against the SFT model.

Stage 1 trains SFT on targets with a carry-dropping habit (``<workdir>/sft``); stage 2 runs a
preference loss on pairs covering carry and no-carry prompts with the SFT model as both the
initial policy and the frozen reference (``<workdir>/dpo``). Both go through
:func:`alignjax.train.loop.run_train` (each stage's config: :func:`alignjax.train.pipeline.stage_config`).
Held-out prompts are answered by greedy decoding and checked by
the task's verifier before and after DPO, and so are the validation prompts (the split that
hyperparameters are chosen on); ``<workdir>/summary.json`` holds the task accuracy (overall and by
carry; test and validation), the held-out pair accuracies and the wall time, ``<workdir>/curves.png``
the curves. How the task, model and hyperparameters were chosen: ``experiments/quickstart.py``.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from matplotlib.figure import Figure

import alignjax.losses as losses
from alignjax import storage
from alignjax.data import synthetic
from alignjax.data.pipeline import resolve_tokenizer
from alignjax.eval.task_accuracy import task_accuracy
from alignjax.train.loop import run_train
from alignjax.train.metrics import plot_curves, read_metrics
from alignjax.train.pipeline import stage_config


def run(config: Any, workdir: str) -> dict[str, Any]:
    """The ``quickstart`` job (module docstring); returns the summary (also in ``summary.json``)."""
    t0 = time.time()
    root = storage.path(workdir)

    tokenizer = resolve_tokenizer(config.data.tokenizer)
    splits = synthetic.arithmetic_splits(config.quickstart.split_seed)
    held_out = synthetic.arithmetic_eval_records(splits["test"][: config.quickstart.num_test])
    # Validation prompts (disjoint from train and test): what hyperparameters are chosen on.
    validation = synthetic.arithmetic_eval_records(splits["val"][: config.quickstart.num_val])

    def accuracy(model: Any, params: Any, records: list = held_out) -> dict[str, float]:
        return task_accuracy(
            model,
            params,
            tokenizer,
            records,
            synthetic.arithmetic_verify,
            max_new_tokens=config.quickstart.max_new_tokens,
            group_key="carry",
        )

    sft = run_train(stage_config(config, "sft"), root / "sft")
    model, sft_params = sft.model, sft.params
    before, val_before = accuracy(model, sft_params), accuracy(model, sft_params, validation)
    t_sft = time.time() - t0
    dpo = run_train(
        stage_config(config, "dpo"),
        root / "dpo",
        init_params=sft_params,
        ref_params=sft_params,
        model=model,
    )
    after = accuracy(model, dpo.params)
    val_after = accuracy(model, dpo.params, validation)
    label = objective_name(config.dpo.loss, details=False)
    summary = {
        "task_accuracy/sft": before["accuracy"],
        "task_accuracy/dpo": after["accuracy"],
        "task_accuracy/val_sft": val_before["accuracy"],
        "task_accuracy/val_dpo": val_after["accuracy"],
        "task_accuracy/gain_points": 100.0 * (after["accuracy"] - before["accuracy"]),
        **{f"task_{k}/sft": v for k, v in before.items() if k != "accuracy"},
        **{f"task_{k}/dpo": v for k, v in after.items() if k != "accuracy"},
        "pair_accuracy/sft": dpo.summary.get("eval/ref_ranking_accuracy"),
        "pair_accuracy/dpo": dpo.summary.get("eval/ranking_accuracy"),
        "reward_accuracy/dpo": dpo.summary.get("eval/reward_accuracy"),
        "num_test_prompts": len(held_out),
        "num_val_prompts": len(validation),
        "loss": config.dpo.loss.name,
        "objective": objective_name(config.dpo.loss),
        "steps/sft": int(sft.summary["steps"]),
        "steps/dpo": int(dpo.summary["steps"]),
        "wall_s/sft": round(t_sft, 1),
        "wall_s/total": round(time.time() - t0, 1),
        "data/sft": {k: v for k, v in sft.summary.items() if k.startswith("data/")},
        "data/dpo": {k: v for k, v in dpo.summary.items() if k.startswith("data/")},
    }
    if jax.process_index() == 0:
        storage.write_text(root / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
        figure = quickstart_figure(
            read_metrics(root / "dpo" / "metrics.jsonl"), before, after, label, num_prompts=len(held_out)
        )
        save_figure(figure, root / "curves.png")
        plot_curves(root / "sft" / "metrics.jsonl", root / "sft_curves.png", "SFT")
        print(headline(summary), flush=True)
    return summary


def objective_name(loss: Mapping[str, Any], *, details: bool = True) -> str:
    """What a reader calls the objective ``config.loss`` trains: ``"RPO (DPO + NLL)"`` for DPO with
    the trainer's NLL term (``nll_weight`` > 0), ``"DPO"`` for ``sigmoid``/``dpo`` alone, else the
    configured name (``"+ NLL"`` when the trainer adds the term); ``details`` appends beta and the
    NLL weight (``"RPO (DPO + NLL), beta 2, NLL weight 1"``)."""
    names = [n.strip() for n in str(loss["name"]).split("+")]
    canonical = [losses.canonical(n) for n in names]
    nll = float(loss.get("nll_weight") or 0.0)
    # cpo/rpo/spar take nll_weight themselves: then the trainer adds no term of its own.
    own_nll = any("nll_weight" in losses.spec(n).hyperparameters for n in canonical)
    base = "DPO" if canonical == ["dpo"] else "+".join(names)
    if nll and not own_nll:
        label = "RPO (DPO + NLL)" if canonical == ["dpo"] else f"{base} + NLL"
    else:
        label = base
    if not details:
        return label
    extra = [f"beta {float(loss['beta']):g}"] if loss.get("beta") is not None else []
    if nll:
        extra.append(f"NLL weight {nll:g}")
    return ", ".join([label, *extra])


def headline(summary: Mapping[str, Any]) -> str:
    """The lines the quickstart prints at the end: the objective it ran and its figures, rounded
    (accuracies to 3 decimals, the gain to 0.1 point, wall time to 1 s)."""
    label = summary["objective"].split(",")[0]
    carry = [
        f"{name} {summary[f'{key}/sft']:.3f} -> {summary[f'{key}/dpo']:.3f}"
        for key, name in (("task_accuracy/carry=True", "carry"), ("task_accuracy/carry=False", "no carry"))
        if f"{key}/sft" in summary
    ]
    lines = [
        f"quickstart: {summary['objective']}; "
        f"{summary['steps/dpo']} steps after {summary['steps/sft']} SFT steps",
        f"  held-out task accuracy ({summary['num_test_prompts']} prompts): SFT "
        f"{summary['task_accuracy/sft']:.3f} -> {label} {summary['task_accuracy/dpo']:.3f} "
        f"({summary['task_accuracy/gain_points']:+.1f} points)" + (f"; {', '.join(carry)}" if carry else ""),
        f"  validation task accuracy ({summary['num_val_prompts']} prompts): "
        f"{summary['task_accuracy/val_sft']:.3f} -> {summary['task_accuracy/val_dpo']:.3f}",
    ]
    if summary.get("pair_accuracy/dpo") is not None:
        lines.append(
            f"  pair ranking accuracy (validation pairs): {summary['pair_accuracy/sft']:.3f} -> "
            f"{summary['pair_accuracy/dpo']:.3f}"
        )
    lines.append(f"  wall time {summary['wall_s/total']:.0f} s")
    return "\n".join(lines)


def quickstart_figure(
    rows: Sequence[Mapping[str, Any]],
    before: Mapping[str, float],
    after: Mapping[str, float],
    label: str,
    *,
    num_prompts: int,
) -> Figure:
    """The demo's result on one figure: held-out task accuracy before and after preference training,
    overall and by carry class; the training loss (titled with the objective); the evaluation on
    the validation pairs over steps (ranking and reward accuracy; the chosen answers' token NLL).

    ``rows``: the preference stage's ``metrics.jsonl``; ``before``/``after``: ``task_accuracy``'s
    results (``accuracy``, ``accuracy/carry=True``, ``accuracy/carry=False``)."""
    fig = Figure(figsize=(13.5, 3.2), dpi=80)
    ax_task, ax_loss, ax_eval, ax_nll = fig.subplots(1, 4)

    groups = [("all", "accuracy"), ("carry", "accuracy/carry=True"), ("no carry", "accuracy/carry=False")]
    groups = [(name, key) for name, key in groups if key in before and key in after]
    width = 0.38
    for offset, (stage, values) in ((-width / 2, ("SFT", before)), (width / 2, (label, after))):
        heights = [values[key] for _, key in groups]
        bars = ax_task.bar([i + offset for i in range(len(groups))], heights, width, label=stage)
        ax_task.bar_label(bars, fmt="%.3f", fontsize=7)
    ax_task.set_xticks(range(len(groups)), [name for name, _ in groups])
    ax_task.set_ylim(0, 1.3)  # room above the bars for the legend
    ax_task.set_title(f"task accuracy, {num_prompts} held-out prompts", fontsize=9)
    ax_task.legend(fontsize=7, loc="upper center", ncol=2)

    train = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in train]
    marker = "o" if len(train) < 20 else None  # a short run's few logged points stay visible
    ax_loss.plot(steps, [r["loss"] for r in train], marker=marker, markersize=3, label="total")
    if any("loss/objective" in r and r["loss/objective"] != r["loss"] for r in train):
        ax_loss.plot(
            steps, [r["loss/objective"] for r in train], marker=marker, markersize=3, label="preference term"
        )
        ax_loss.legend(fontsize=7)
    ax_loss.set_title(f"training loss: {label}", fontsize=9)

    evals = sorted((r for r in rows if "eval/ranking_accuracy" in r), key=lambda r: r["step"])
    eval_steps = [r["step"] for r in evals]
    for key, name in (
        ("eval/ranking_accuracy", "ranking accuracy"),
        ("eval/reward_accuracy", "reward accuracy"),
    ):
        if any(key in r for r in evals):
            ax_eval.plot(eval_steps, [r.get(key) for r in evals], marker="o", markersize=3, label=name)
    if evals and "eval/ref_ranking_accuracy" in evals[-1]:
        ax_eval.axhline(
            evals[-1]["eval/ref_ranking_accuracy"], color="gray", ls="--", lw=1, label="SFT (reference)"
        )
    ax_eval.set_ylim(0, 1.05)
    ax_eval.set_title("evaluation: validation pairs", fontsize=9)
    ax_eval.legend(fontsize=7, loc="lower right")
    ax_nll.plot(eval_steps, [r.get("eval/nll_chosen") for r in evals], marker="o", markersize=3)
    ax_nll.set_title("evaluation: chosen answers' token NLL", fontsize=9)
    for ax in (ax_loss, ax_eval, ax_nll):
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, png_path: storage.PathLike) -> None:
    """Writes ``fig`` as a PNG wherever ``png_path`` is (rendered in memory first: ``gs://`` too)."""
    png = io.BytesIO()
    fig.savefig(png, format="png")
    storage.write_bytes(png_path, png.getvalue())
