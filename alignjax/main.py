"""The entry point: flags -> config -> run.

  python -m alignjax.main --config=experiments/<file>.py[:args] --workdir=DIR [--config.key=value ...]

``config.job`` picks what runs (:data:`alignjax.jobs.JOBS`, each a module of :mod:`alignjax.jobs`):
``train`` (preference or SFT training), ``quickstart`` (the embedded default: SFT then DPO against
the SFT model), ``score`` (implicit-reward scoring), ``source_logps`` / ``semantic_distance`` /
``prompt_classifier`` (per-row columns for InfiFPO / Sem-DPO / BCO's distribution matching),
``reward_model``, ``mcts_dpo`` (search-then-train rounds), the online jobs ``grpo`` / ``rloo`` /
``online_dpo`` / ``ppo`` and the paper reproductions ``repro_*``. Everything a user can get wrong in
the command line (an unknown config key, loss name, model preset or job) fails here, before any
compute, with the valid choices. The workdir receives ``config.json``; rerunning with the same
workdir resumes, one run at a time and only with a config that does not change what the run
computes (docs/reliability.md).
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from alignjax import host_memory
from alignjax.configs import check_config_file, load_config_file
from alignjax.jobs import JOBS  # the table only: a job's module is imported when it runs
from alignjax.train.result import TrainResult

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/<file>.py[:args]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for config.json, metrics, checkpoints, summary")


def flat_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf of ``config`` (``loss.beta``, ``mesh.data``, ...)."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ConfigDict):
            keys.extend(flat_keys(value, path + "."))
        else:
            keys.append(path)
    return keys


def check_overrides(argv: Sequence[str]) -> None:
    """Fails on ``--config.key=value`` for a key the config does not have, naming the valid keys."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if config_arg is None or not overrides:
        return
    valid = flat_keys(load_config_file(config_arg))
    prefixes = {k.rsplit(".", i)[0] for k in valid for i in range(k.count(".") + 1)}
    for key in overrides:
        if key not in prefixes:
            raise SystemExit(
                f"--config.{key}: unknown config key {key!r} in {config_arg}; valid keys:\n  "
                + "\n  ".join(valid)
            )


def validate(config: ConfigDict) -> None:
    """Checks names a user can mistype (job, loss, model preset) before any compute."""
    if config.job not in JOBS:
        raise ValueError(f"config.job={config.job!r}; valid jobs: {sorted(JOBS)}")
    if config.job in ("train",) and "loss" in config:
        import alignjax.losses as losses
        from alignjax.train.step import check_loss_config

        losses.load_module(config.loss.get("module", ""))  # a user's losses, before any name is read
        check_loss_config(config)  # unknown name: KeyError listing the losses; inputs no data provides
    for key in ("model.path", "reference.path"):
        section, field = key.split(".")
        path = config.get(section, {}).get(field, "")
        if path and "@" in path and path.rpartition("@")[2].isdigit():
            path = path.rpartition("@")[0]  # a training workdir at a checkpoint step (score.py)
        if path and not os.path.isdir(path):
            check_model_name(path, key)
    check_ranges(config)


# key -> (smallest allowed value, what the value means): values a run would otherwise die on
# mid-way (a division by zero) or finish "successfully" with nothing trained or nothing kept.
MINIMUM = {
    "train.num_steps": (0, "optimizer steps"),
    "train.log_every": (1, "steps between logged metrics"),
    "train.checkpoint_every": (1, "steps between checkpoints"),
    "train.keep_checkpoints": (1, "checkpoints kept; 0 would delete the trained model"),
    "train.eval_every": (0, "steps between evaluations, 0 = only at the end"),
    "optim.grad_accum_steps": (1, "micro-batches per step"),
    "data.batch_size": (1, "examples per step"),
    "data.eval_batch_size": (1, "examples per evaluation batch"),
}


def check_ranges(config: ConfigDict) -> None:
    """Numeric keys within their range (:data:`MINIMUM`), and a DPO-family ``loss.beta`` above 0,
    checked wherever the config (or a stage of it, like the quickstart's ``sft``/``dpo``) has them."""
    for key, (low, meaning) in MINIMUM.items():
        section, field = key.split(".")
        value = config.get(section, {}).get(field)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < low:
            raise ValueError(f"config.{key}={value}: must be >= {low} ({meaning})")
    beta = config.get("loss", {}).get("beta")
    if config.get("job") in ("grpo", "rloo"):  # there beta is a KL coefficient: 0 = no reference
        beta = None if beta == 0 else beta
    if isinstance(beta, int | float) and beta <= 0:
        raise ValueError(f"config.loss.beta={beta}: must be > 0 (the scale of the implicit reward)")


def check_model_name(name: str, key: str) -> None:
    """A model path that is not a directory must be a preset name."""
    from alignjax.models import PRESETS

    if name not in PRESETS:
        raise ValueError(
            f"config.{key}={name!r} is neither a directory nor a model preset; presets: {sorted(PRESETS)}"
        )


def check_workdir(workdir: str) -> None:
    """The workdir is a directory or does not exist yet (it is created)."""
    from alignjax import storage

    root = storage.path(workdir)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"--workdir={workdir} is a file, not a directory")


def write_config(config: ConfigDict, workdir: str) -> None:
    """``<workdir>/config.json`` for a fresh workdir; on a resume, the check against it and the
    record of allowed changes (``alignjax.train.workdir.record_config``); process 0 writes."""
    import jax

    from alignjax.train import workdir as workdirlib

    workdirlib.record_config(config, workdir, write=jax.process_index() == 0)


def run(config: ConfigDict, workdir: str) -> dict[str, Any] | TrainResult:
    """Runs ``config.job`` in ``workdir`` and returns what the job returns (its summary; the ``train``
    job's :class:`TrainResult`), holding the workdir's lock (process 0) from before ``config.json`` is
    checked until the job ends, however it ends."""
    validate(config)
    check_workdir(workdir)
    if config.get("distributed") is not None and config.distributed.enabled:
        from alignjax.sharding import initialize_distributed

        # num_processes 0 = discover (TPU pods, SLURM); CPU runs give all three (launch/local.py).
        count = int(config.distributed.num_processes) or None
        initialize_distributed(
            coordinator_address=config.distributed.coordinator_address or None,
            num_processes=count,
            process_id=int(config.distributed.process_id) if count else None,
        )
    from alignjax.train import workdir as workdirlib

    break_lock = bool(config.get("train", {}).get("break_lock", False))
    with workdirlib.locked_by_process_0(workdir, break_lock=break_lock):
        write_config(config, workdir)
        module, function = JOBS[config.job].split(":")
        return getattr(importlib.import_module(module), function)(config, workdir)


# What a user can get wrong (a config value, a data row, a path, a checkpoint that does not fit):
# reported as one line without a traceback; --debug shows it.
USER_ERRORS = (
    ValueError,
    KeyError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FloatingPointError,  # a non-finite step (alignjax.train.guards.NonFiniteStep)
)
USAGE_EXIT = 2


def is_user_error(err: BaseException) -> bool:
    """One of :data:`USER_ERRORS`, or a full disk (the user frees space and reruns)."""
    return isinstance(err, USER_ERRORS) or (isinstance(err, OSError) and err.errno == errno.ENOSPC)


def error_line(err: BaseException) -> str:
    """The message of ``err`` as the user should read it (KeyError's repr quotes stripped)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err) or type(err).__name__


def fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def debug_requested(argv: Sequence[str]) -> bool:
    """--debug is read from argv directly: errors in parsing the other flags must honour it too."""
    return any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)


_DEBUG = flags.DEFINE_bool("debug", False, "show the traceback of an error instead of its one-line message")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=USAGE_EXIT)
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required", exitcode=USAGE_EXIT)
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        result = run(_CONFIG.value, _WORKDIR.value)
    except Exception as err:
        if _DEBUG.value or not is_user_error(err):
            raise
        fail(error_line(err), 1)
    summary = result.summary if isinstance(result, TrainResult) else result
    print(json.dumps(summary, indent=1, default=str))


def _parse_flags(argv: list[str]) -> list[str]:
    """Flag and config-file errors are usage errors: one message, exit code 2."""
    try:
        check_config_file(argv)
        check_overrides(argv)
        remaining = flags.FLAGS(argv)
        if _CONFIG.value is None:  # config_flags loads lazily: loading here makes its errors usage errors
            raise app.UsageError("--config is required")
        validate(_CONFIG.value)
        return remaining
    except SystemExit as err:
        if isinstance(err.code, str):
            fail(err.code, USAGE_EXIT)
        raise
    except (flags.Error, app.UsageError, *USER_ERRORS) as err:
        if debug_requested(argv):
            raise
        # config_flags wraps errors raised by get_config(); the root cause is the useful part.
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        fail(error_line(cause if cause is not err and isinstance(cause, USER_ERRORS) else err), USAGE_EXIT)


if __name__ == "__main__":
    host_memory.retain_freed_memory()  # before anything starts XLA's threads
    app.run(main, flags_parser=_parse_flags)
