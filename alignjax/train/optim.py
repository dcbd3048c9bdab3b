"""Optimiser from config: AdamW with linear warmup then cosine / linear / constant decay, clipping.

Gradient accumulation is not an optimiser wrapper here: the train step scans over
``config.optim.grad_accum_steps`` micro-batches and averages their gradients, so one optimiser
update sees the full-batch gradient (see :func:`alignjax.train.step.make_train_step`).
"""

from __future__ import annotations

from typing import Any

import optax

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(optim: Any, num_steps: int) -> optax.Schedule:
    """Learning rate at step s: linear warmup 0 -> lr over ``warmup_steps``, then decay to
    ``lr * end_learning_rate_factor`` at ``num_steps`` (cosine or linear), or constant."""
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"config.optim.schedule={optim.schedule!r}; choose one of {list(SCHEDULES)}")
    lr = float(optim.learning_rate)
    warmup = int(optim.warmup_steps)
    end = lr * float(optim.end_learning_rate_factor)
    decay_steps = max(1, int(num_steps) - warmup)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(optim: Any, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` from ``config.optim`` (name ``adamw`` or ``sgd``)."""
    schedule = make_schedule(optim, num_steps)
    if optim.name == "adamw":
        core = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    elif optim.name == "sgd":
        core = optax.sgd(schedule)
    else:
        raise ValueError(f"config.optim.name={optim.name!r}; choose one of ['adamw', 'sgd']")
    parts = [optax.clip_by_global_norm(optim.grad_clip_norm)] if optim.grad_clip_norm > 0 else []
    return optax.chain(*parts, core), schedule
