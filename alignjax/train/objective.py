"""The train loop's extension point: what an objective gives ``run_train`` (in the spirit of
nanodo's ``LossFnFactory``). Preference/SFT training (``alignjax.train.loop.PREFERENCE``), reward
models (``alignjax.reward.train.RewardObjective``) and the online methods
(``alignjax.online.train.PolicyGradientObjective``) implement it; the loop owns everything else
(data, state, checkpoints, metrics, evaluation schedule, signals).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np
import optax

State = dict[str, Any]
HostBatch = Mapping[str, np.ndarray]


class StepSpec(Protocol):
    """What the loop reads of a step's static description (hashable: the step closes over it)."""

    loss: str  # the objective's name in progress bars, plots and the summary
    reference: str  # "model" (a reference forward on state["ref_params"]), "batch" (cached) or "none"
    batch_size: int  # examples per micro-batch (global)
    hyperparameters: tuple[tuple[str, Any], ...]

    @property
    def stateful(self) -> bool: ...  # the loss threads a state (``losses.get(loss).init_state()``)

    @property
    def num_sequences(self) -> int: ...


TrainStep = Callable[[State, Mapping[str, jax.Array]], tuple[State, dict[str, jax.Array]]]
EvalFn = Callable[[Any, Any, Mapping[str, jax.Array]], dict[str, jax.Array]]


class Objective(Protocol):
    """``make_step_spec`` -> ``make_train_step`` (jitted by the loop with the state's shardings),
    ``make_eval_fn`` + ``evaluate`` (held-out metrics every ``config.train.eval_every`` steps and at
    the end), ``model_flops`` (the ``perf/*`` accounting of one host micro-batch)."""

    def make_step_spec(self, config: Any, batch_size: int, reference: str) -> StepSpec: ...

    def make_train_step(
        self, model: Any, spec: Any, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
        sync_every: int = 0, sync_alpha: float = 1.0,
    ) -> TrainStep: ...

    def make_eval_fn(self, model: Any, spec: Any) -> EvalFn: ...

    def evaluate(
        self, eval_fn: EvalFn, params: Any, ref_params: Any, batches: list[dict[str, jax.Array]], beta: float
    ) -> dict[str, float]: ...

    def model_flops(self, model: Any, spec: Any, host: HostBatch) -> float: ...


@runtime_checkable
class RolloutObjective(Protocol):
    """An objective whose step trains on what the current policy generates: ``prepare_batch`` turns
    each step's data micro-batches (prompts) into rollout batches before the step runs."""

    def prepare_batch(self, state: State, micro: Sequence[HostBatch], step: int) -> list[dict]: ...
