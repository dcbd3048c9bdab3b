"""Staged configs: one config file holding several training stages (``config.sft``, ``config.dpo``)
of a pipeline, such as the quickstart job's (:mod:`alignjax.jobs.quickstart`), the reproductions'
SFT -> preference runs and the MCTS-DPO and online jobs' SFT and DPO stages."""

from __future__ import annotations

from typing import Any

import alignjax.losses as losses

# Sections that configure a job around its training stages; a stage's train config has none of them.
JOB_SECTIONS = ("sft", "dpo", "quickstart", "online", "mcts_dpo", "search")
# config.loss keys that are not a loss's hyperparameters.
LOSS_SETTINGS = ("name", "weights", "module", "nll_weight")


def stage_config(config: Any, stage: str, **data: Any) -> Any:
    """The full train config of one stage: the shared keys plus ``config.<stage>`` overrides and the
    ``data`` keys given here, as a plain ``train`` job (no job sections).

    ``config.loss`` keeps only the hyperparameters of the stage's loss: a stage that trains another
    loss than the job's (the SFT stage of a GRPO job) does not inherit the job loss's (GRPO's ``beta``
    would be an unknown key of ``sft``), while a stage training the job's loss keeps its values.
    """
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.job = "train"
        for section, values in config[stage].items():
            if not hasattr(values, "items"):
                raise ValueError(f"config.{stage}.{section} must be a section (data, loss, optim, ...)")
            for key, value in values.items():
                c[section][key] = value
        for key, value in data.items():
            c.data[key] = value
        for key in JOB_SECTIONS:
            if key in c:
                del c[key]
        own = set(LOSS_SETTINGS) | set(config[stage].get("loss", {}).keys())
        losses.load_module(c.loss.get("module", ""))
        for name in (n.strip() for n in str(c.loss.name).replace(",", "+").split("+") if n.strip()):
            own |= set(losses.spec(name).hyperparameters)
        for key in [k for k in c.loss.keys() if k not in own]:
            del c.loss[key]
    return c
