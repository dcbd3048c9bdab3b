"""The embedded default (``make demo``): SFT on the arithmetic task, then DPO against the SFT model.

Stage 1 trains SFT on targets with a carry-dropping habit (``<workdir>/sft``); stage 2 runs a
preference loss on pairs covering carry and no-carry prompts with the SFT model as both the
initial policy and the frozen reference (``<workdir>/dpo``). Both go through
:func:`alignjax.train.loop.run_train`. Held-out prompts are answered by greedy decoding and checked by
the task's verifier before and after DPO, and so are the validation prompts (the split that
hyperparameters are chosen on); ``<workdir>/summary.json`` holds the task accuracy (overall and by
carry; test and validation), the held-out pair accuracies and the wall time, ``<workdir>/curves.png``
the curves. How the task, model and hyperparameters were chosen: ``experiments/quickstart.py``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax

from alignjax import storage
from alignjax.train.generate import task_accuracy
from alignjax.train.loop import run_train
from alignjax.train.metrics import plot_curves


def stage_config(config: Any, stage: str) -> Any:
    """The full train config of one stage: the shared keys plus ``config.<stage>`` overrides."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.job = "train"
        for section, values in config[stage].items():
            if hasattr(values, "items"):
                for key, value in values.items():
                    c[section][key] = value
            else:
                raise ValueError(f"config.{stage}.{section} must be a section (data, loss, optim, ...)")
        for key in ("sft", "dpo", "quickstart"):
            if key in c:
                del c[key]
    return c


def run_quickstart(config: Any, workdir: str) -> dict[str, Any]:
    t0 = time.time()
    root = storage.path(workdir)
    from alignjax.data import synthetic
    from alignjax.data.pipeline import resolve_tokenizer

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
    model, sft_params = sft["_model"], sft["_state"]["params"]
    before, val_before = accuracy(model, sft_params), accuracy(model, sft_params, validation)
    t_sft = time.time() - t0
    dpo = run_train(
        stage_config(config, "dpo"),
        root / "dpo",
        init_params=sft_params,
        ref_params=sft_params,
        model=model,
    )
    after = accuracy(model, dpo["_state"]["params"])
    val_after = accuracy(model, dpo["_state"]["params"], validation)
    summary = {
        "task_accuracy/sft": before["accuracy"],
        "task_accuracy/dpo": after["accuracy"],
        "task_accuracy/val_sft": val_before["accuracy"],
        "task_accuracy/val_dpo": val_after["accuracy"],
        "task_accuracy/gain_points": 100.0 * (after["accuracy"] - before["accuracy"]),
        **{f"task_{k}/sft": v for k, v in before.items() if k != "accuracy"},
        **{f"task_{k}/dpo": v for k, v in after.items() if k != "accuracy"},
        "pair_accuracy/sft": dpo.get("eval/ref_ranking_accuracy"),
        "pair_accuracy/dpo": dpo.get("eval/ranking_accuracy"),
        "reward_accuracy/dpo": dpo.get("eval/reward_accuracy"),
        "num_test_prompts": len(held_out),
        "num_val_prompts": len(validation),
        "loss": config.dpo.loss.name,
        "wall_s/sft": t_sft,
        "wall_s/total": time.time() - t0,
        "data/sft": {k: v for k, v in sft.items() if k.startswith("data/")},
        "data/dpo": {k: v for k, v in dpo.items() if k.startswith("data/")},
    }
    if jax.process_index() == 0:
        storage.write_text(root / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
        plot_curves(
            root / "dpo" / "metrics.jsonl", root / "curves.png", f"DPO after SFT ({config.dpo.loss.name})"
        )
        plot_curves(root / "sft" / "metrics.jsonl", root / "sft_curves.png", "SFT")
        print(
            f"held-out task accuracy: SFT {before['accuracy']:.3f} -> DPO {after['accuracy']:.3f} "
            f"({summary['task_accuracy/gain_points']:+.1f} points; validation "
            f"{val_before['accuracy']:.3f} -> {val_after['accuracy']:.3f}); pair accuracy "
            f"{summary['pair_accuracy/sft']} -> {summary['pair_accuracy/dpo']}; "
            f"{summary['wall_s/total']:.0f} s"
        )
    summary["_state"] = dpo["_state"]
    return summary
