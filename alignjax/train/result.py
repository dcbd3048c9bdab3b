"""What :func:`alignjax.train.loop.run_train` returns: the summary it wrote, the final state, the model.

Kept free of JAX so that :mod:`alignjax.main` can recognise it without loading JAX first.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """One training run's outcome.

    ``summary`` is what ``summary.json`` holds and the ``train`` job prints (for a run stopped by a
    signal: ``{"stopped_at": step, "reason": signal}``, and no ``summary.json``); ``state`` the final
    train state dict (``params``, ``opt_state``, ``step``, ``ref_params`` where the state keeps a
    reference, ...), None for a stopped run, whose checkpoint holds its state; ``model`` the model
    that trained.
    """

    summary: dict[str, Any]
    state: Any
    model: Any

    @property
    def stopped(self) -> bool:
        """The run stopped at a signal before its last step (rerunning the workdir resumes it)."""
        return self.state is None

    @property
    def params(self) -> Any:
        """The final params (``state["params"]``)."""
        if self.state is None:
            raise RuntimeError(
                f"the run stopped before its last step ({self.summary}): it has no final params; "
                "rerun it in the same workdir to resume from its checkpoint"
            )
        return self.state["params"]
