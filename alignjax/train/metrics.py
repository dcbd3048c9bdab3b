"""Metric sinks: ``metrics.jsonl`` (one JSON object per logged step, with ``step``), ``perf.jsonl``
(throughput and MFU at the same steps), TensorBoard, and the training-curve PNG. Only process 0 writes.

Speed lives in its own file because it is the one thing a run does not reproduce: ``metrics.jsonl``
holds what the computation produced, and a resumed run rewrites it bit for bit.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jax
from etils import epath

from alignjax import storage

CURVES = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm")


class MetricWriter:
    """Appends metrics to ``<workdir>/metrics.jsonl`` (``perf.jsonl``) and TensorBoard (``<workdir>/tb``),
    wherever the workdir is (``alignjax.storage``: a local directory or ``gs://``). Every row goes to
    both: training steps, throughput and evaluations (``eval/*``, the final one included).

    Locally a row is appended as it comes. An object store has no append, so there the writer keeps
    each file's text and uploads it whole, at most every ``flush_s`` seconds and on :meth:`flush`
    and :meth:`close`; the loop flushes before every checkpoint, so a resumed run finds every row up
    to its checkpoint. ``truncate_after(step)`` drops lines past a restored checkpoint so that a
    resumed run's file equals an uninterrupted run's; ``reset()`` empties both files (a fresh start).
    """

    def __init__(self, workdir: storage.PathLike, *, tensorboard: bool = True, flush_s: float = 10.0):
        root = storage.path(workdir)
        self.path = root / "metrics.jsonl"
        self.perf_path = root / "perf.jsonl"
        self.active = jax.process_index() == 0
        self.local = storage.is_local(root)
        self.flush_s = flush_s
        self._text: dict[epath.Path, str] = {}  # object store: each file's whole text
        self._dirty: set[epath.Path] = set()
        self._flushed_at = time.monotonic()
        self.tb = None
        # Opened at the first row, so a writer that adds nothing (a finished run's rerun) leaves no
        # empty event file behind.
        self._tb_dir = os.fspath(root / "tb") if self.active and tensorboard else None
        if self.active:
            root.mkdir(parents=True, exist_ok=True)

    def _set(self, path: epath.Path, text: str) -> None:
        storage.write_text(path, text)
        if not self.local:
            self._text[path] = text
            self._dirty.discard(path)

    def truncate_after(self, step: int) -> None:
        """Keeps the rows up to ``step``; a last line cut short (a kill mid-write) is dropped, with a
        note: every row it could have held is past the checkpoint and is written again."""
        if not self.active:
            return
        for path in (self.path, self.perf_path):
            if path.exists():
                lines = path.read_text().splitlines(keepends=True)
                if lines and not lines[-1].endswith("\n"):
                    print(f"note: {path}: dropped a partial last line {lines.pop()!r}", flush=True)
                self._set(path, "".join(x for x in lines if x.strip() and json.loads(x)["step"] <= step))

    def write_once(self, step: int, metrics: Mapping[str, Any]) -> None:
        """:meth:`write`, unless ``metrics.jsonl`` already has a row at ``step`` with these keys (a
        rerun of a finished run adds nothing)."""
        if not self.active or not metrics:
            return
        if self.path.exists():
            keys = {"step", *metrics}
            if any(r["step"] == step and set(r) == keys for r in read_metrics(self.path)):
                return
        self.write(step, metrics)

    def reset(self) -> None:
        if not self.active:
            return
        for path in (self.path, self.perf_path):
            path.unlink(missing_ok=True)
            self._text[path] = ""
            self._dirty.discard(path)

    def write(self, step: int, metrics: Mapping[str, Any], *, perf: bool = False) -> None:
        """Appends a row to ``metrics.jsonl`` (``perf=True``: to ``perf.jsonl``) and TensorBoard."""
        if not self.active or not metrics:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in sorted(metrics.items())}}
        line = json.dumps(row) + "\n"
        path = self.perf_path if perf else self.path
        if self.local:
            with path.open("a") as f:
                f.write(line)
        else:
            if path not in self._text:
                self._text[path] = path.read_text() if path.exists() else ""
            self._text[path] += line
            self._dirty.add(path)
            if time.monotonic() - self._flushed_at >= self.flush_s:
                self.flush()
        if self._tb_dir is not None:
            if self.tb is None:
                from tensorboardX import SummaryWriter

                # Why the suffix: the event file is named by the second it was opened, and a second
                # writer opened in the same second (the final evaluation's, a resumed run's) would
                # truncate the first one's file.
                self.tb = SummaryWriter(self._tb_dir, filename_suffix=f".{uuid.uuid4().hex[:12]}")
            for key, value in row.items():
                if key != "step" and isinstance(value, float | int) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def flush(self) -> None:
        """Uploads the rows not yet in the object store (locally they already are)."""
        for path in sorted(self._dirty):
            storage.write_text(path, self._text[path])
        self._dirty.clear()
        self._flushed_at = time.monotonic()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Steady-state speed between logged steps: ``perf/step_s``, ``perf/tokens_per_s``,
    ``perf/model_tflop_per_s_per_device`` (``alignjax.flops`` accounting) and ``perf/mfu`` (where the
    device's peak is known).

    A window runs from the moment one logged step's metrics were read to the moment the next one's
    were (a step's metrics are read once it has finished), so the compile before the first read is
    left out, while checkpoint saves and evaluations inside a window are counted. Tokens and FLOPs are
    this process's; tokens/s is scaled by the process count (every process gets an equal share of the
    batch), and FLOP/s is divided by this process's devices.
    """

    def __init__(self, *, local_devices: int, processes: int = 1, peak_flops: float | None = None):
        self.local_devices, self.processes, self.peak_flops = local_devices, processes, peak_flops
        self._work: dict[int, tuple[int, float]] = {}
        self._last: tuple[int, float] | None = None

    def add(self, step: int, tokens: int, flops: float) -> None:
        """Records step ``step``'s work (this process's rows) when it is dispatched."""
        self._work[step] = (tokens, flops)

    def finished(self, step: int, now: float) -> dict[str, float]:
        """``step`` has finished at time ``now`` (seconds): the speed since the previous call."""
        last, self._last = self._last, (step, now)
        done = [self._work.pop(s) for s in sorted(self._work) if s <= step]  # the window's steps
        tokens, flops = sum(t for t, _ in done), sum(f for _, f in done)
        if last is None or step <= last[0] or now <= last[1]:
            return {}
        seconds = now - last[1]
        out = {
            "perf/step_s": seconds / (step - last[0]),
            "perf/tokens_per_s": tokens * self.processes / seconds,
            "perf/model_tflop_per_s_per_device": flops / seconds / self.local_devices / 1e12,
        }
        if self.peak_flops:
            out["perf/mfu"] = flops / seconds / self.local_devices / self.peak_flops
        return out


def _plain(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def read_metrics(path: storage.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: storage.PathLike, png_path: storage.PathLike, title: str = "") -> str | None:
    """Plots the CURVES present in ``metrics.jsonl`` against step into ``png_path`` (Agg backend)."""
    if jax.process_index() != 0 or not storage.path(metrics_path).exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    keys = [k for k in CURVES if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = io.BytesIO()  # rendered in memory, then written wherever png_path is
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    storage.write_bytes(png_path, png.getvalue())
    return os.fspath(png_path)


class Progress:
    """The progress bar (``config.train.progress``, process 0): the last loss read (metrics arrive one
    step late) and tokens/s since the previous step; messages go through it or to stdout."""

    def __init__(self, config: Any, num_steps: int, start: int, label: str):
        self.bar = None
        if config.train.progress and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=num_steps, initial=start, desc=label, dynamic_ncols=True)
        self.t_last = time.time()

    def update(self, tokens: int, last_metrics: Mapping[str, float]) -> None:
        if self.bar is None:
            return
        dt = max(time.time() - self.t_last, 1e-9)
        shown = {"loss": f"{last_metrics['loss']:.4f}"} if "loss" in last_metrics else {}
        self.bar.set_postfix(**shown, tok_s=f"{tokens / dt:.0f}")
        self.bar.update(1)
        self.t_last = time.time()

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
