"""Peak extra host memory of the Hugging Face export (``alignjax.models.save_pretrained``, what
``python -m alignjax.export`` and the reward-model export call) against model size, 1 and 2 processes.

For each size a Llama-shaped model is initialised with random fp32 weights, sharded over an fsdp
mesh of 8 CPU devices (with 2 ``jax.distributed`` processes: 4 each); then the process's peak
resident set is reset (``/proc/self/clear_refs``) and the model exported in bf16 with
``--max_shard_size``. Reported per process: the peak RSS above the RSS before the export
("extra"), the model's bf16 bytes, and the bound the export is designed to: one safetensors shard
buffer plus the largest tensor in fp32 and bf16 (gathered, then cast), i.e. ``extra / bound <= 1``
at every size. The baseline the ratios use is this process's own pre-export RSS and the model's
own bytes, so the figures compare across sizes on one machine.

    python bench/export_memory.py [--sizes=100M,300M,700M] [--processes=1,2] [--max_shard_size=100MB]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import host  # noqa: E402

SIZES = {  # ~parameters -> (hidden, layers, intermediate, heads, kv heads); vocabulary 32000, untied
    "100M": (768, 8, 2048, 12, 4),
    "300M": (1024, 20, 2816, 16, 8),
    "700M": (1536, 23, 4096, 16, 8),
}
DEVICES = 8


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakRSS:
    """Peak resident set from now on: the kernel's high-water mark after a reset where allowed,
    else sampled every 2 ms."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.sampled = None
        except OSError:
            self.sampled, self._stop = rss_bytes(), False
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop:
            self.sampled = max(self.sampled, rss_bytes())
            time.sleep(0.002)

    def peak(self) -> int:
        if self.sampled is None:
            return rss_bytes("VmHWM")
        self._stop = True
        self._thread.join()
        return self.sampled


def measure(size: str, max_shard_size: str, out: str) -> dict:
    """Exports one model of ``size`` from this process (one of possibly several) and measures."""
    import jax

    from alignjax import sharding
    from alignjax.models import Model, save_pretrained
    from alignjax.models.hf import parse_size
    from alignjax.models.presets import PRESETS

    hidden, layers, inter, heads, kv = SIZES[size]
    config = PRESETS["tiny"].replace(
        vocab_size=32000,
        hidden_size=hidden,
        num_layers=layers,
        intermediate_size=inter,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        tie_word_embeddings=False,
        param_dtype="float32",
        dtype="float32",
    )
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    model = Model(config, mesh=mesh)
    params = jax.jit(model.init, out_shardings=model.shardings(mesh))(jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    leaves = jax.tree.leaves(params)
    count = sum(x.size for x in leaves)
    largest = max(x.size for x in leaves)
    gc.collect()
    peak = PeakRSS()
    before = rss_bytes()
    t0 = time.perf_counter()
    save_pretrained(model, params, out, dtype="bfloat16", max_shard_size=max_shard_size)
    seconds = time.perf_counter() - t0
    extra = peak.peak() - before
    bound = parse_size(max_shard_size) + largest * (4 + 2)
    return {
        "size": size,
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "params_M": round(count / 1e6, 1),
        "model_bf16_MB": round(count * 2 / 2**20),
        "largest_tensor_M": round(largest / 1e6, 1),
        "rss_before_MB": round(before / 2**20),
        "extra_MB": round(extra / 2**20),
        "extra_over_model": round(extra / (count * 2), 3),
        "extra_over_bound": round(extra / bound, 3),
        "export_s": round(seconds, 1),
    }


def child(args: argparse.Namespace) -> None:
    import jax

    if args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as out:
            result = measure(size, args.max_shard_size, os.path.join(args.out or out, size))
            print("RESULT " + json.dumps(result), flush=True)


def launch(n: int, args: argparse.Namespace) -> list[dict]:
    """Runs the sizes in ``n`` fresh processes (``DEVICES / n`` CPU devices each)."""
    shared = tempfile.mkdtemp()
    try:
        return host.run_children(
            __file__,
            n,
            lambda i, address: [
                f"--sizes={args.sizes}", f"--max_shard_size={args.max_shard_size}", f"--num_processes={n}",
                f"--process_id={i}", f"--coordinator={address}", f"--out={shared}",
            ],  # fmt: skip
            devices_per_process=DEVICES // n,
        )
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100M,300M,700M")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--max_shard_size", default="100MB")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num_processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    host.print_header()
    columns = ("size", "processes", "process", "params_M", "model_bf16_MB", "largest_tensor_M")
    columns += ("rss_before_MB", "extra_MB", "extra_over_model", "extra_over_bound", "export_s")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for n in (int(x) for x in args.processes.split(",")):
        for r in sorted(launch(n, args), key=lambda r: (list(SIZES).index(r["size"]), r["process"])):
            print("| " + " | ".join(str(r[c]) for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
