"""The ``train`` job (``experiments/dpo.py``, ``experiments/sft.py``, ...): preference or SFT training
of ``config`` in ``workdir`` through :func:`alignjax.train.loop.run_train`, which owns the whole run
(data, model, state, steps, checkpoints, evaluation, ``summary.json``)."""

from __future__ import annotations

from typing import Any

from alignjax.train.loop import run_train
from alignjax.train.result import TrainResult


def run(config: Any, workdir: str) -> TrainResult:
    """The ``train`` job: the loop's result, whose ``summary`` the entry point prints."""
    return run_train(config, workdir)
