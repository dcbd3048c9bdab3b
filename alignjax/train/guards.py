"""What keeps a run trustworthy while it steps: a non-finite step stops it (the state keeps the last
good step), a streak of zero gradients is reported, and SIGTERM / SIGINT save and exit cleanly."""

from __future__ import annotations

import signal
from collections.abc import Mapping
from typing import Any

import jax


class NonFiniteStep(FloatingPointError):
    """A step's loss, gradient norm or updated parameters were NaN or infinite; the step was not
    applied and the run stops, keeping its last good checkpoint."""


# Consecutive steps with a gradient norm of exactly 0 after which the run says it no longer learns.
ZERO_GRAD_STREAK = 5


def nonfinite_message(
    step: int, causes: list[str], values: Mapping[str, float], last_saved: int | None, directory: Any
) -> str:
    """Why the run stopped at ``step`` and which checkpoint to resume from."""
    finite_loss = "" if "loss" in causes else f" (its loss, {values['loss']:.6g}, was finite)"
    advice = "lower config.optim.learning_rate or check the data"
    kept = (
        f"The last good checkpoint (step {last_saved}) is kept in {directory}; {advice}, then rerun "
        "to resume from it."
        if last_saved
        else f"No checkpoint was saved before it; {advice}."
    )
    return f"step {step} was not applied: non-finite {' and '.join(causes)}{finite_loss}; stopping. {kept}"


class ZeroGradients:
    """Counts steps whose gradient norm is exactly 0 and says once per streak of
    :data:`ZERO_GRAD_STREAK` that the model no longer learns (a saturated or detached model)."""

    def __init__(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate
        self.total, self.streak = 0, 0

    def add(self, step: int, grad_norm: float) -> None:
        self.streak = self.streak + 1 if grad_norm == 0.0 else 0
        self.total += grad_norm == 0.0
        if self.streak == ZERO_GRAD_STREAK and jax.process_index() == 0:
            print(
                f"warning: grad_norm has been exactly 0 for {ZERO_GRAD_STREAK} steps (steps "
                f"{step - ZERO_GRAD_STREAK + 1}-{step}): the model no longer learns (saturated: is "
                f"config.optim.learning_rate={self.learning_rate:g} too large?)",
                flush=True,
            )

    def summary(self) -> dict[str, int]:
        return {"train/zero_grad_steps": self.total} if self.total else {}


class Stop:
    """SIGTERM / SIGINT (Ctrl-C) flag: the loop saves a checkpoint at the next step boundary and
    exits cleanly, resumable, instead of dying mid-step with nothing saved."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Stop:
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
