"""Orbax checkpoints of the whole run: train state, data-iterator state and a shape manifest.

A step directory only becomes visible when complete (orbax writes to a temporary directory and
renames it on commit), so a run killed at any point restarts from the last complete checkpoint.
The manifest (model config, parameter shapes) lets a restart refuse a checkpoint of another model.

A LoRA run's checkpoint holds the trainable state only: the adapters (and a reward model's head),
their optimizer state, step, rng, data position; the frozen base is not written. The manifest keeps
a fingerprint of the base (``base_fingerprint``), and a restore rebuilds the base as the run first
did (``config.model.path``, ``config.seed``) and refuses one with another fingerprint
(:meth:`Checkpointer.with_frozen`).

A step that is there but does not restore (a truncated or deleted file, an empty directory, a
missing item) is moved to ``checkpoints/damaged/<step>-<reason>``, never deleted, and the previous
step is used (:meth:`Checkpointer.restore_latest`).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from alignjax import storage
from alignjax.models import lora

ITEMS = ("state", "data", "manifest")


class CheckpointMismatch(ValueError):
    """The workdir holds a checkpoint that does not fit the configured model."""


class DiskFull(OSError):
    """A checkpoint does not fit on its file system; nothing of it is left behind."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


# Room kept for a checkpoint's metadata files (sharding, array metadata, JSON items) beyond its
# arrays' bytes.
METADATA_ALLOWANCE = 1 << 20


def local_state_bytes(state: Any) -> int:
    """Bytes of the array shards this process writes for ``state`` (one replica of each)."""
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(state)
        if isinstance(leaf, jax.Array)
        for shard in leaf.addressable_shards
        if shard.replica_id == 0
    )


def fits(needed: int, free: int | None) -> bool:
    return free is None or needed <= free


def _everywhere(ok: bool) -> bool:
    """Whether ``ok`` holds on every process: a save some processes skip would hang the others."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def is_disk_full(err: BaseException) -> bool:
    text = str(err)  # TensorStore's errors carry the OS error only in their text
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in text


def shape_manifest(abstract_state: Any, model_config: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able description of what a checkpoint must match: param paths -> shapes, model config."""
    shapes = {
        jax.tree_util.keystr(path): list(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state["params"])
    }
    return {"model_config": dict(model_config), "param_shapes": shapes}


def check_manifest(saved: Mapping[str, Any], current: Mapping[str, Any], directory: storage.PathLike) -> None:
    """Raises CheckpointMismatch naming the first parameter (or config field) that differs."""
    old, new = saved.get("param_shapes", {}), current["param_shapes"]
    problems = [
        f"{k}: checkpoint {old.get(k)} vs model {new.get(k)}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if problems:
        diff = {
            k: (saved["model_config"].get(k), v)
            for k, v in current["model_config"].items()
            if saved.get("model_config", {}).get(k) != v
        }
        raise CheckpointMismatch(
            f"{directory} holds a checkpoint of a different model and cannot be resumed: "
            f"{problems[0]}"
            + (f" ({len(problems) - 1} more)" if len(problems) > 1 else "")
            + (f"; model config differs in {diff} (checkpoint, now)" if diff else "")
            + ". Use a fresh --workdir, or the model config the checkpoint was written with"
            + (f" (--config.model.scan_layers={diff['scan_layers'][0]})." if "scan_layers" in diff else ".")
        )


class Checkpointer:
    """``CheckpointManager`` with three items: ``state`` (pytree), ``data`` and ``manifest`` (JSON)."""

    def __init__(self, directory: storage.PathLike, *, keep: int = 2, async_save: bool = True):
        self.directory = storage.path(directory)  # orbax writes gs:// itself
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
        )
        self._quiet = contextlib.ExitStack()
        self._quiet.enter_context(_disk_full_noise_silenced())
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=ITEMS
        )
        self._base_fingerprint: list[float] | None = None
        self.restored_manifest: dict | None = None  # of the step restore_latest returned

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(
        self, abstract_state: Any, manifest: Mapping[str, Any]
    ) -> tuple[int, Any, dict] | None:
        """``(step, state, data_state)`` of the newest step that restores, None when none does.

        Each newer step that fails (see :func:`damage`) is moved aside with a message saying what was
        wrong; a checkpoint of another model (:class:`CheckpointMismatch`) is not damage and raises.
        """
        moved = []
        with _unraisable_silenced():
            found = self._first_good(abstract_state, manifest, moved)
        if found is None and moved:
            print(f"no usable checkpoint left in {self.directory}: starting from step 0", flush=True)
        return found

    def _first_good(self, abstract_state: Any, manifest: Mapping[str, Any], moved: list) -> Any:
        for step in sorted(self.manager.all_steps(), reverse=True):
            # orbax and TensorStore raise bare Exceptions, KeyErrors, JSON errors...: any of them
            # means this step cannot be resumed from.
            try:
                saved = self._manifest(step)
            except Exception as err:
                moved.append(self._move_aside(step, *damage(self.directory / str(step), err, "manifest")))
                continue
            check_manifest(saved, manifest, self.directory)
            self.restored_manifest = saved
            try:
                return (step, *self._items(step, abstract_state))
            except Exception as err:
                moved.append(self._move_aside(step, *damage(self.directory / str(step), err, "state")))
        return None

    def _move_aside(self, step: int, reason: str, detail: str) -> str:
        target = self.directory / "damaged" / f"{step}-{reason}"
        while target.exists():  # an earlier damaged copy of the same step is kept too
            target = target.parent / f"{target.name}-again"
        if jax.process_index() == 0:
            storage.move(self.directory / str(step), target)
        self.manager.reload()
        print(
            f"checkpoint step {step} in {self.directory} is damaged ({detail}); moved to {target}, "
            "trying the previous step",
            flush=True,
        )
        return str(target)

    def save(self, step: int, state: Any, data_state: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
        """Saves ``step`` (asynchronously where configured) after checking that it fits on disk.

        A save that would not fit, or that runs out of space while writing, raises
        :class:`DiskFull` naming the directory, with no partial step left behind.
        """
        state, manifest = self._trainable_only(state, manifest)
        needed = local_state_bytes(state) + METADATA_ALLOWANCE
        free = storage.free_bytes(self.directory)
        if not _everywhere(fits(needed, free)):
            self.wait()
            raise DiskFull(
                f"no space for checkpoint step {step} in {self.directory}: it needs about "
                f"{needed / 2**20:.1f} MiB and {(free or 0) / 2**20:.1f} MiB are free"
                f"{self._resume_hint()}"
            )
        with self._disk_full_reported():
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(dict(data_state)),
                    manifest=ocp.args.JsonSave(dict(manifest)),
                ),
                force=True,
            )

    def _trainable_only(self, state: Any, manifest: Mapping[str, Any]) -> tuple[Any, dict]:
        """A LoRA state without its frozen base, and the manifest with the base's fingerprint
        (computed once: the base never changes in a run)."""
        if not lora.has_adapters(state.get("params")):
            return state, dict(manifest)
        if self._base_fingerprint is None:
            self._base_fingerprint = fingerprint(lora.frozen_part(state["params"]))
        slim = dict(state, params=lora.trainable_tree(state["params"]))
        return slim, {**manifest, "base_fingerprint": self._base_fingerprint}

    def with_frozen(self, state: Any, fresh: Any) -> Any:
        """A restored LoRA state (trainable leaves only) completed with the frozen base of
        ``fresh()`` (the run's initial state, built as at its start); others as they are. Raises
        :class:`CheckpointMismatch` when that base is not the one the checkpoint was trained on."""
        saved = (self.restored_manifest or {}).get("base_fingerprint")
        if saved is None:
            return state
        full = fresh()
        now = fingerprint(lora.frozen_part(full["params"]))
        if not np.allclose(now, saved, rtol=1e-5, atol=1e-6):
            raise CheckpointMismatch(
                f"{self.directory} holds LoRA adapters trained on another base model (its fingerprint "
                "differs): resume with the config.model.path and config.seed it was trained with, or "
                "use a fresh --workdir"
            )
        return dict(state, params=lora.fill_frozen(state["params"], full["params"]))

    def _resume_hint(self) -> str:
        latest = self.latest_step()
        start = f"resume from step {latest}" if latest is not None else "start again"
        return f"; free space on it (or use another --workdir) and rerun to {start}"

    @contextlib.contextmanager
    def _disk_full_reported(self) -> Iterator[None]:
        """A write that ran out of space: its temporary step removed, one :class:`DiskFull` raised."""
        try:
            yield
        except Exception as err:
            if not is_disk_full(err):
                raise
            self._remove_temporaries()
            raise DiskFull(
                f"no space left on device writing a checkpoint in {self.directory}; its partial files were "
                f"removed{self._resume_hint()}"
            ) from None

    def _remove_temporaries(self) -> None:
        if jax.process_index() == 0:
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                tmp.rmtree()
        self.manager.reload()

    def _manifest(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))[
            "manifest"
        ]

    def _items(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        if "base_fingerprint" in (self.restored_manifest or {}):  # a LoRA step: the trainable leaves
            abstract_state = dict(abstract_state, params=lora.trainable_tree(abstract_state["params"]))
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["data"])

    def wait(self) -> None:
        with self._disk_full_reported():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
            self.manager.close()
        finally:
            self._quiet.close()


@contextlib.contextmanager
def _unraisable_silenced() -> Iterator[None]:
    """When one array of a damaged step fails to read, orbax drops its other reads' coroutines
    unawaited; their errors, the one already reported, would print as "Exception ignored in ..."
    tracebacks whenever they are collected. Collected here, silently."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


class _DiskFullNoise(logging.Filter):
    """Drops orbax's logged tracebacks of a write that ran out of space (:class:`DiskFull` reports it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        full = is_disk_full(err) if err is not None else "No space left on device" in record.getMessage()
        return not full


@contextlib.contextmanager
def _disk_full_noise_silenced() -> Iterator[None]:
    """While a checkpointer is open: orbax logs every failed write of a full disk with its
    traceback from its background threads, and TensorStore's callbacks for the other writes, arriving
    after orbax's event loop closed, each print "RuntimeError: Event loop is closed" through
    ``sys.excepthook``. Those records and only those are dropped."""
    previous = sys.excepthook

    def hook(kind: type, value: BaseException, tb: Any) -> None:
        if not (kind is RuntimeError and str(value) == "Event loop is closed"):
            previous(kind, value, tb)

    noise = _DiskFullNoise()
    logger = logging.getLogger("absl")
    sys.excepthook = hook
    logger.addFilter(noise)
    try:
        yield
    finally:
        logger.removeFilter(noise)
        sys.excepthook = previous


def damage(step_dir: Any, err: BaseException, phase: str) -> tuple[str, str]:
    """``(reason, detail)`` of a step whose ``phase`` (``manifest`` or ``state``) failed to restore
    with ``err``: a short name for the directory it is moved to (``empty``, ``no-<item>``,
    ``bad-manifest``, ``bad-state``) and the first line of what went wrong."""
    if not step_dir.exists() or not any(step_dir.iterdir()):
        return "empty", "the step directory is empty"
    for item in ITEMS:
        if not (step_dir / item).exists():
            return f"no-{item}", f"its {item!r} item is missing"
    first_line = (str(err).strip().splitlines() or [""])[0][:300]
    return f"bad-{phase}", f"{phase} does not restore: {type(err).__name__}: {first_line}"


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def fingerprint(params: Any) -> list[float]:
    """A cheap content fingerprint of a pytree of arrays: per leaf (sum, sum |x|, sum x * w) with a
    fixed weight pattern w, rounded to 6 significant digits so that reduction order does not matter."""

    @jax.jit
    def stats(tree):
        def one(x):
            x = x.astype(np.float32).reshape(-1)
            w = (jax.numpy.arange(x.shape[0]) % 7).astype(np.float32)
            return jax.numpy.stack([x.sum(), abs(x).sum(), (x * w).sum()])

        return [one(x) for x in jax.tree.leaves(tree)]

    values = (
        np.concatenate([np.asarray(v) for v in stats(params)]) if jax.tree.leaves(params) else np.zeros(0)
    )
    return [float(f"{v:.6g}") for v in values]
