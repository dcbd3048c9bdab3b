"""``bench/lora_memory.py`` runs as its docstring says at tiny size: the header docs/benchmarks.md
records, full fine-tuning as the 1.00x baseline, LoRA/QLoRA without a reference copy and with
rank x (in + out) trainable parameters per adapted projection."""

from __future__ import annotations

import json

from tests.bench.test_bench_commands import _run

TINY = [
    "--preset=tiny",
    "--memory-preset=tiny",
    "--pairs=2",
    "--length=16",
    "--steps=1",
    "--variants=full,nf4",
]


def test_lora_memory_benchmark_at_tiny_size():
    out = _run("bench/lora_memory.py", *TINY)
    rows = json.loads(next(line for line in out.splitlines() if line.startswith("JSON "))[5:])
    assert [r["variant"] for r in rows] == ["full fine-tuning", "QLoRA nf4 r=16"]
    assert "| full fine-tuning |" in out and "| 1.00x |" in out
    full, *adapted = rows
    assert full["ref_copy"] and not any(r["ref_copy"] for r in adapted)
    # tiny: D=64, H=4, K=2, Dh=16, F=256, 2 layers; r (in + out) for q, k, v, o, gate, up, down
    d, q, kv, f, r = 64, 64, 32, 256, 16
    per_layer = r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    assert all(row["trainable"] == 2 * per_layer for row in adapted)
    assert all(row["peak_mib"] < full["peak_mib"] for row in adapted)
