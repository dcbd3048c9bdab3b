"""Where a benchmark ran, and how it starts its ``jax.distributed`` children on one machine.

Standard library only: a benchmark's parent process imports this without importing jax.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lscpu_model() -> str:
    """``lscpu``'s "Model name" (the machine the figures come from)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    names = (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    return next(names, "unknown")


def print_header() -> None:
    """The machine (model, cores, load), the command and the date, as docs/benchmarks.md records them."""
    print(f"machine: {lscpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"command: {' '.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}")
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_children(
    script: str,
    num_processes: int,
    argv: Callable[[int, str], list[str]],
    *,
    devices_per_process: int,
    timeout: float | None = None,
) -> list[dict]:
    """Runs ``script --child <argv(i, coordinator address)>`` as ``num_processes`` CPU processes of
    ``devices_per_process`` devices each and returns the JSON of every ``RESULT {...}`` line they
    print, in process order. A failed child stops the benchmark with the end of its output; no child
    is left waiting on the coordinator."""
    address = f"127.0.0.1:{_free_port()}"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(script), "--child", *argv(i, address)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            if p.returncode:
                raise SystemExit(f"a benchmark process failed (exit {p.returncode}):\n{out[-3000:]}")
            results += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results
