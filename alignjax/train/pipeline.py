"""Staged configs: one config file holding several training stages (``config.sft``, ``config.dpo``)
of a pipeline, such as the quickstart job's (:mod:`alignjax.jobs.quickstart`), the reproductions'
SFT -> preference runs and the MCTS-DPO and online jobs' SFT stage."""

from __future__ import annotations

from typing import Any


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
