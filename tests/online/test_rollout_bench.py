"""bench/rollout_throughput.py runs as its docstring says, at tiny size, printing the header
docs/benchmarks.md records and a table whose baseline (transformers) row is 1.00x of itself."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_rollout_benchmark_smoke():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    args = ["bench/rollout_throughput.py", "--preset=tiny", "--prompts=2", "--num-generations=2",
            "--new-tokens=8", "--rounds=1"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for field in ("machine: ", "command: ", "date: "):
        assert any(line.startswith(field) for line in lines), proc.stdout
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "tokens/s" not in line]
    assert [r[0].strip() for r in rows] == ["transformers generate", "alignjax rollout (KV-cache Generator)"]
    assert rows[0][4].strip() == "1.00x" and rows[0][1].strip() == rows[1][1].strip() == "32"
