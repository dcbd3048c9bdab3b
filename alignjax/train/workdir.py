"""One run per workdir, and a record of the config each step was trained with.

- ``lock.json``: taken by process 0 before anything is written (created only if absent: ``O_EXCL``
  locally, a ``if_generation_match=0`` upload on gs://), holding host, pid and start time; removed
  on exit, error or SIGTERM/SIGINT. A second run is refused naming the holder. A lock left by a
  killed run on this host (its pid is gone) is taken over with a note; otherwise
  ``--config.train.break_lock=true`` or deleting the file breaks it.
- ``config.json``: written once, by the run that starts the workdir, and never overwritten. A
  resume compares its config with it (patched by ``config_history.jsonl``): changes that alter what
  the run computes are refused with a ``key: old -> new`` diff before anything is written;
  :data:`HARMLESS` ones, keys the code gained or lost since, and any with
  ``--config.train.allow_config_change=true`` are appended to ``config_history.jsonl`` with the
  step they apply from.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from alignjax import storage

LOCK = "lock.json"
CONFIG = "config.json"
HISTORY = "config_history.jsonl"

# Keys whose change on resume leaves what each step computes unchanged: how often things are
# logged, evaluated or saved, and how they are shown. train.num_steps only when extended (the
# learning-rate schedule's horizon then follows the new count).
HARMLESS = frozenset({
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.async_checkpoints",
    "train.progress",
    "train.plot",
    "train.tensorboard",
    "distributed.coordinator_address",  # where the processes meet, not what they compute
    "distributed.process_id",
    "data.cache_dir",  # where tokenized rows are kept; its key covers everything they depend on
})
# Per-invocation switches: never part of the comparison.
CONTROLS = frozenset({"train.break_lock", "train.allow_config_change"})
_ABSENT = "(absent)"


class WorkdirLocked(ValueError):
    """Another run holds the workdir."""


class ConfigChanged(ValueError):
    """A resume's config differs from the workdir's in a way that would mix two runs."""


# ------------------------------------------------------------------------------------------ lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_HELD: set[str] = set()  # the lock texts this process holds


def _gone(pid: int, text: str) -> bool:
    """The holder on this host has exited; a lock naming this very pid that this process does not
    hold was left by an earlier process the pid was reused for (a restarted container)."""
    return not _pid_alive(pid) or (pid == os.getpid() and text not in _HELD)


def _holder(text: str) -> dict[str, Any]:
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except json.JSONDecodeError:
        return {}


def _describe(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "an unreadable lock"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {started}"


@contextlib.contextmanager
def locked(workdir: storage.PathLike, *, break_lock: bool = False) -> Iterator[None]:
    """Holds ``<workdir>/lock.json`` for the duration of the block (call on process 0 only)."""
    lock = storage.path(workdir) / LOCK
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
    if not storage.create_exclusive(lock, mine):
        text = lock.read_text() if lock.exists() else ""
        holder = _holder(text)
        stale = holder.get("host") == socket.gethostname() and _gone(int(holder.get("pid", -1)), text)
        if not (stale or break_lock):
            raise WorkdirLocked(
                f"{os.fspath(workdir)} is in use by another run ({_describe(holder)}; {os.fspath(lock)}). "
                "Wait for it, or if it is gone, rerun with --config.train.break_lock=true or delete "
                "that file."
            )
        why = "its process is gone" if stale else "--config.train.break_lock=true"
        print(f"note: taking over the lock of {_describe(holder)} ({why}): {os.fspath(lock)}", flush=True)
        storage.remove_if(lock, text)
        if not storage.create_exclusive(lock, mine):
            raise WorkdirLocked(f"{os.fspath(workdir)}: another run took the lock first ({os.fspath(lock)})")
    _HELD.add(mine)
    try:
        yield
    finally:
        _HELD.discard(mine)
        storage.remove_if(lock, mine)


@contextlib.contextmanager
def locked_by_process_0(workdir: storage.PathLike, *, break_lock: bool = False) -> Iterator[None]:
    """:func:`locked` taken by process 0 for all processes: when process 0 is refused, every
    process raises (the others would otherwise wait on it in their first collective)."""
    import jax

    if jax.process_count() == 1:
        with locked(workdir, break_lock=break_lock):
            yield
        return
    from jax.experimental import multihost_utils

    with contextlib.ExitStack() as stack:
        refused: WorkdirLocked | None = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(locked(workdir, break_lock=break_lock))
            except WorkdirLocked as err:
                refused = err
        taken = multihost_utils.process_allgather(np.asarray(refused is None))
        if refused is not None:
            raise refused
        if not np.all(taken):
            raise WorkdirLocked(f"{os.fspath(workdir)}: in use by another run (process 0 was refused)")
        yield


# ------------------------------------------------------------------------------------------ config


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Flat keys whose values differ (``(absent)`` for a key one side lacks), controls left out."""
    keys = (set(old) | set(new)) - CONTROLS
    pairs = {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(keys)}
    return {k: (o, n) for k, (o, n) in pairs.items() if o != n}


def harmless(key: str, old: Any, new: Any) -> bool:
    if _ABSENT in (old, new):
        # A key added to (or removed from) the code since the workdir was started: a new key's
        # default keeps the behaviour the run had without it, a removed one cannot be set.
        return True
    if key == "train.num_steps":
        return isinstance(old, int) and isinstance(new, int) and new >= old
    return key in HARMLESS


def _resume_step(root: Any) -> int | None:
    """The newest checkpoint step directory (what a resume starts from), None when there is none."""
    directory = root / "checkpoints"
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
    return max(steps) if steps else None


def holds_run(path: storage.PathLike) -> bool:
    """Whether ``path`` is a run's workdir: its ``config.json`` is an alignjax config (it has a
    ``job``), with or without checkpoints yet; an HF model directory's has none."""
    config = storage.path(path) / CONFIG
    if not config.exists():
        return False
    try:
        return "job" in json.loads(config.read_text())
    except ValueError:
        return False


def effective_config(workdir: storage.PathLike) -> dict[str, Any] | None:
    """The flat config the workdir's latest steps were trained with: ``config.json`` with every
    ``config_history.jsonl`` change applied; None for a workdir without ``config.json``."""
    root = storage.path(workdir)
    if not (root / CONFIG).exists():
        return None
    flat = flatten(json.loads((root / CONFIG).read_text()))
    history = root / HISTORY
    for line in history.read_text().splitlines() if history.exists() else []:
        if line.strip():
            for key, (_, new) in json.loads(line)["changes"].items():
                if new == _ABSENT:
                    flat.pop(key, None)
                else:
                    flat[key] = new
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (the inverse of :func:`flatten`)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, field = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[field] = value
    return tree


def record_config(config: Any, workdir: storage.PathLike, *, write: bool = True) -> None:
    """Writes ``config.json`` for a fresh workdir; on a resume checks ``config`` against the saved
    one (see the module docstring) and records allowed changes. ``write=False`` (processes other
    than 0) only checks."""
    root = storage.path(workdir)
    new = flatten(json.loads(config.to_json(sort_keys=True)))
    step = _resume_step(root)
    old = effective_config(root) if step is not None else None
    if old is None:  # nothing to resume: this run starts the workdir
        if write:
            root.mkdir(parents=True, exist_ok=True)
            (root / HISTORY).unlink(missing_ok=True)  # a previous run's, whose checkpoints are gone
            storage.write_text(root / CONFIG, config.to_json(indent=2, sort_keys=True))
        return
    changes = diff(old, new)
    if not changes:
        return
    refused = {k: v for k, v in changes.items() if not harmless(k, *v)}
    train = config.get("train", {})
    if refused and not train.get("allow_config_change", False):
        lines = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in refused.items())
        raise ConfigChanged(
            f"{os.fspath(workdir)} was trained to step {step} with a different config, and resuming "
            f"would mix two runs: {lines}. Use a fresh --workdir, or the saved config "
            f"({os.fspath(root / CONFIG)}), or record the change with "
            "--config.train.allow_config_change=true."
        )
    if write:
        entry = {
            "step": step,
            "time": time.time(),
            "changes": {k: list(v) for k, v in changes.items()},
            "allowed_by": "train.allow_config_change" if refused else "harmless",
        }
        history = root / HISTORY
        before = history.read_text() if history.exists() else ""
        storage.write_text(history, before + json.dumps(entry, sort_keys=True) + "\n")
    if refused:
        print(f"note: config changed from step {step} (recorded in {HISTORY}): {sorted(refused)}", flush=True)
