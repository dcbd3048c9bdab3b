"""``bench/collectives.py`` runs as its docstring's smoke line says and prints the header
docs/benchmarks.md records, one table per mesh with every collective kind, and its JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_collectives_benchmark_smoke_command():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the benchmark sets its own device count
    args = ["bench/collectives.py", "--preset=tiny", "--layers=1", "--pairs=4", "--length=16",
            "--meshes=fsdp=8;data=2,fsdp=2,tensor=2", "--xla-defaults",
            '--overrides={"scan_layers": true}']  # fmt: skip
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for field in ("machine: ", "command: ", "date: "):
        assert any(line.startswith(field) for line in lines), proc.stdout
    for mesh in ("fsdp=8", "data=2,fsdp=2,tensor=2"):
        assert any(line.startswith(f"mesh {mesh}: ") for line in lines), proc.stdout
    rows = {
        line.split("|")[1].strip()
        for line in lines
        if line.startswith("| ") and not line.startswith("| collective |")
    }
    assert rows == {"all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute"}
    results = json.loads(next(x for x in lines if x.startswith("JSON "))[5:])["results"]
    assert [r["mesh"] for r in results] == [
        {"data": 1, "fsdp": 8, "tensor": 1},
        {"data": 2, "fsdp": 2, "tensor": 2},
    ]
    for r in results:
        assert r["warnings"] == 0 and r["over_budget"] == [], r
        assert r["temp_bytes"] > 0, r
        assert r["measured"]["all-reduce"]["count"] > 0  # the gradients' reduction
