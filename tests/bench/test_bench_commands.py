"""The data-pipeline and compile-time benchmarks run as their docstrings say, at tiny sizes, and
print the header docs/benchmarks.md records (machine, command, date) and a table whose baseline row
is 1.00x of itself."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the benchmarks choose their own device counts
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for field in ("machine: ", "command: ", "date: "):
        assert any(line.startswith(field) for line in out.splitlines()), out
    return out


def test_data_pipeline_benchmark_runs_cold_and_cached_on_one_and_two_processes(tmp_path):
    out = _run("bench/data_pipeline.py", "--rows=300", "--processes=1,2", f"--out={tmp_path}")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 300 |")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [
        ("1", "cold"), ("1", "cached"), ("2", "cold"), ("2", "cached")
    ]
    assert rows[0][4].strip() == "1.00"


def test_compile_layers_benchmark_runs_both_layouts():
    out = _run(
        "bench/compile_layers.py", "--layers=2", "--repeats=1", "--width=64", "--vocab=256", "--pairs=8",
        "--length=32",
    )  # fmt: skip
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 2 |")]
    assert sorted(r[1].strip() for r in rows) == ["scan", "unrolled"]
    assert all(r[5].strip() == "1.00x" for r in rows)
