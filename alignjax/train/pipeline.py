"""Staged configs: one config file holding several training stages (``config.sft``, ``config.dpo``)
of a pipeline, such as the quickstart job's (:mod:`alignjax.jobs.quickstart`), the reproductions'
SFT -> preference runs and the MCTS-DPO and online jobs' SFT and DPO stages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import alignjax.losses as losses
from alignjax.configs import STAGES

# Sections that configure a job around its training stages; a stage's train config has none of them.
JOB_SECTIONS = (*STAGES, "quickstart", "online", "mcts_dpo", "search")
# config.loss keys that are not a loss's hyperparameters.
LOSS_SETTINGS = ("name", "weights", "module", "nll_weight")


def _loss_names(name: str) -> list[str]:
    return [n.strip() for n in str(name).replace(",", "+").split("+") if n.strip()]


def _unknown_key(where: str, key: str, known: Iterable[str], what: str) -> ValueError:
    close = difflib.get_close_matches(key, list(known), n=1)
    return ValueError(
        f"{where}.{key}: not a key of {what}" + (f" (did you mean {close[0]!r}?)" if close else "")
    )


def check_stage(config: Any, stage: str) -> None:
    """Fails in one line on the first key of ``config.<stage>`` that overrides no shared key: every
    ``config.<stage>.<section>.<key>`` names a key of ``config.<section>`` (in ``loss``, also a
    hyperparameter of the loss the stage trains), so that a misspelt override cannot be silently
    ignored or added as a key nothing reads."""
    if stage not in config:
        raise ValueError(f"config.{stage}: no such stage section (the stages: {list(STAGES)})")
    for section, values in config[stage].items():
        if not hasattr(values, "items"):
            raise ValueError(f"config.{stage}.{section} must be a section (data, loss, optim, ...)")
        base = config.get(section)
        if section in JOB_SECTIONS or not hasattr(base, "items"):
            sections = [k for k, v in config.items() if hasattr(v, "items") and k not in JOB_SECTIONS]
            raise _unknown_key(f"config.{stage}", section, sections, "the shared sections of config")
        unknown = [key for key in values.keys() if key not in base]
        if not unknown:
            continue
        known, what = set(base.keys()), f"config.{section}"
        if section == "loss":  # the stage's loss may take hyperparameters the job's loss does not
            loss = values.get("name", base.get("name"))
            losses.load_module(values.get("module", base.get("module", "")))
            for name in _loss_names(loss):
                known |= set(losses.spec(name).hyperparameters)
            what = f"config.loss nor a hyperparameter of {loss!r}"
        for key in unknown:
            if key not in known:
                raise _unknown_key(f"config.{stage}.{section}", key, known, what)


def stage_config(config: Any, stage: str, **data: Any) -> Any:
    """The full train config of one stage: the shared keys plus ``config.<stage>`` overrides and the
    ``data`` keys given here, as a plain ``train`` job (no job sections).

    Every override must name a shared key (:func:`check_stage`). ``config.loss`` keeps only the
    hyperparameters of the stage's loss: a stage that trains another loss than the job's (the SFT
    stage of a GRPO job) does not inherit the job loss's (GRPO's ``beta`` would be an unknown key of
    ``sft``), while a stage training the job's loss keeps its values.
    """
    check_stage(config, stage)
    for key in data:
        if key not in config.data:
            raise _unknown_key("stage_config(data)", key, config.data.keys(), "config.data")
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.job = "train"
        for section, values in config[stage].items():
            for key, value in values.items():
                c[section][key] = value
        for key, value in data.items():
            c.data[key] = value
        for key in JOB_SECTIONS:
            if key in c:
                del c[key]
        own = set(LOSS_SETTINGS) | set(config[stage].get("loss", {}).keys())
        losses.load_module(c.loss.get("module", ""))
        for name in _loss_names(c.loss.name):
            own |= set(losses.spec(name).hyperparameters)
        for key in [k for k in c.loss.keys() if k not in own]:
            del c.loss[key]
    return c
