"""Shared pieces of the reproductions and notebooks: a small SFT -> preference pipeline on the arithmetic
task (through :func:`alignjax.train.loop.run_train`), per-pair log-probs of held-out pairs, tables.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from alignjax import logprobs, recipes, sharding
from alignjax.configs import ConfigDict
from alignjax.repro import params
from alignjax.train.loop import data_iterator, run_train
from alignjax.train.pipeline import stage_config
from alignjax.train.result import TrainResult

PAIRS_VAL = "synthetic:arithmetic_dpo:val"


def repro_params(config: Any, job: str) -> ConfigDict:
    """The reproduction ``job``'s parameters: its defaults (:func:`alignjax.repro.params.defaults`)
    with the values ``config.repro`` sets. A key the reproduction does not declare fails in one line
    naming it and the valid ones (a misspelt key would otherwise be ignored)."""
    out = params.defaults(job)
    given = config.get("repro") or {}
    for key in given:
        if key not in out:
            raise ValueError(f"config.repro.{key}: not a parameter of {job}; valid: {', '.join(sorted(out))}")
        out[key] = copy.deepcopy(given[key])
    return out


def small_config(
    *,
    seed: int = 0,
    sft_steps: int = 60,
    pref_steps: int = 20,
    loss: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    num_eval: int = 128,
    learning_rate: float = 1e-3,
    warmup_steps: int = 2,
) -> ConfigDict:
    """The quickstart config (:func:`alignjax.recipes.quickstart`: 2 layers, width 64) shrunk for a 2-core
    machine.

    ``loss``: the preference stage's ``config.loss`` section (name, hyperparameters, nll_weight).
    Quiet and checkpoint-light: no progress bar, no plots, one synchronous checkpoint per stage.
    """
    c = recipes.quickstart()
    c.seed = seed
    c.data.batch_size = batch_size
    c.data.num_eval = num_eval
    c.data.eval_batch_size = num_eval
    c.train.progress = False
    c.train.plot = False
    c.train.tensorboard = False
    c.train.log_every = 1
    c.train.async_checkpoints = False
    c.train.checkpoint_every = 10**6
    c.sft.train = dict(num_steps=sft_steps)
    c.dpo.train = dict(num_steps=pref_steps)
    c.dpo.optim = dict(learning_rate=learning_rate, warmup_steps=warmup_steps, schedule="cosine")
    c.dpo.loss = dict(loss or dict(name="sigmoid", beta=2.0, nll_weight=0.0))
    return c


def run_sft(config: Any, workdir: str) -> tuple[Any, Any]:
    """Trains the SFT stage; returns ``(model, sft_params)``."""
    out = run_train(stage_config(config, "sft"), os.path.join(workdir, "sft"))
    return out.model, out.params


def run_preference(
    config: Any,
    workdir: str,
    model: Any,
    sft_params: Any,
    loss: Mapping[str, Any] | None = None,
    name: str = "dpo",
) -> TrainResult:
    """Trains the preference stage from ``sft_params`` (also the frozen reference) with ``loss``
    (a ``config.loss`` section; default: the config's). Returns the run's result."""
    c = stage_config(config, "dpo")
    if loss is not None:
        with c.unlocked():
            c.loss = type(c.loss)(dict(loss))
    return run_train(
        c, os.path.join(workdir, name), init_params=sft_params, ref_params=sft_params, model=model
    )


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """Rows of ``<workdir>/metrics.jsonl``."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def pair_logps(
    model: Any,
    params: Any,
    config: Any,
    *,
    source: str = PAIRS_VAL,
    num_pairs: int = 256,
    batch_size: int = 128,
) -> dict[str, np.ndarray]:
    """Summed log-probs and lengths of the first ``num_pairs`` pairs of ``source`` (unshuffled) under
    ``params``: ``chosen_logps, rejected_logps, chosen_lengths, rejected_lengths`` [num_pairs]."""
    data, _ = data_iterator(config, source, batch_size, shuffle=False, num_epochs=1)
    fn = jax.jit(
        lambda p, b: logprobs.batch_sequence_logps(model, p, b, 2 * batch_size)[0],
        compiler_options=logprobs.strict_rounding(model.config.dtype),
    )
    parts: dict[str, list[np.ndarray]] = {}
    seen = 0
    for host in data:
        batch = sharding.global_batch(model.mesh, host)
        seq = np.asarray(fn(params, batch))
        lengths = np.asarray(
            logprobs.sequence_lengths(batch["loss_mask"], batch["example_ids"], 2 * batch_size)
        )
        b = batch_size
        for key, value in (
            ("chosen_logps", seq[:b]),
            ("rejected_logps", seq[b:]),
            ("chosen_lengths", lengths[:b]),
            ("rejected_lengths", lengths[b:]),
        ):
            parts.setdefault(key, []).append(value)
        seen += batch_size
        if seen >= num_pairs:
            break
    return {k: np.concatenate(v)[:num_pairs] for k, v in parts.items()}


# ----------------------------------------------------------------------------- tables


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of per-seed values."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± sd`` of per-seed values."""
    m, s = mean_spread(values)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(workdir: str, payload: Mapping[str, Any], markdown: str) -> None:
    """``<workdir>/table.json`` (all per-seed numbers) and ``<workdir>/table.md``."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=float)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(markdown + "\n")
