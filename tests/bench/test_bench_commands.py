"""The data-pipeline and compile-time benchmarks run as their docstrings say, at tiny sizes, and
print the header docs/benchmarks.md records (machine, command, date) and a table whose baseline row
is 1.00x of itself."""

from __future__ import annotations

import json
import os
import platform
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
    # The default sizes, not tiny ones: the step is compiled on abstract state (no memory), and with
    # logprobs.STRICT_ROUNDING XLA:CPU's legacy emitters unroll small loops fully, so width 64 /
    # vocab 256 / 32 tokens compiled 3x slower than width 512 / vocab 8192 / 128 tokens (186 s vs 55 s).
    out = _run("bench/compile_layers.py", "--layers=2", "--repeats=1")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 2 |")]
    assert sorted(r[1].strip() for r in rows) == ["scan", "unrolled"]
    assert all(r[5].strip() == "1.00x" for r in rows)


def _lscpu_family_model() -> str:
    """``lscpu``'s "CPU family" / "Model" (util-linux, read independently of bench/common.py)."""
    lines = subprocess.check_output(["lscpu"], text=True).splitlines()
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return f"{fields['CPU family']}/{fields['Model']}"


def test_dpo_step_benchmark_reports_each_steps_fraction_of_its_frameworks_measured_peak():
    """``bench/dpo_step.py`` (its bf16 group at tiny size): the machine's matmul features, the four
    measured peaks (JAX and PyTorch, fp32 and bf16) and every row's share of its own peak."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    args = ["bench/dpo_step.py", "--preset=tiny", "--pairs=8", "--length=8", "--groups=bf16", "--rounds=1",
            "--steps=1", "--peak-size=128", "--threads=1"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    machine = json.loads(next(x for x in lines if x.startswith("machine: "))[len("machine: "):])
    assert isinstance(machine["cpu_flags"], list) and "loadavg" in machine
    assert machine["cpu_family_model"] == _lscpu_family_model()
    # both frameworks ran with glibc's allocator retained, as alignjax.main runs
    assert machine["host_malloc_retained"] is (platform.libc_ver()[0] == "glibc")
    peaks = next(x for x in lines if x.startswith("measured matmul peaks"))
    for name in ("jax float32", "jax bfloat16", "torch float32", "torch bfloat16"):
        assert name in peaks, peaks
    header = next(x for x in lines if x.startswith("variant"))
    assert "MFU" in header and "of peak" in header
    (group,) = [g for g in (json.loads(x[len("JSON "):]) for x in lines if x.startswith("JSON "))
                if g.get("group") == "bf16" and "rows" in g]
    fractions = {r["variant"]: r["peak_fraction"] for r in group["rows"]}
    # the synthetic completions (4 of 8 tokens) bound the counted tokens: TRL's use_logits_to_keep row too
    assert set(fractions) == {
        "alignjax fp32", "alignjax bf16", "pytorch fp32", "pytorch amp-bf16",
        "pytorch amp-bf16 logits_to_keep",
    }
    # measured rates of both: positive and finite (at these tiny sizes overheads dominate both)
    assert all(0.0 < f < float("inf") for f in fractions.values()), fractions
