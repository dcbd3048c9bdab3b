"""What each host reads of a Hugging Face checkpoint on import (``alignjax.models.from_pretrained``
with a mesh), 2 ``jax.distributed`` processes of 4 CPU devices each.

A Llama-shaped model (about 100M parameters, random fp32 weights) is saved with
``alignjax.models.save_pretrained``; then each mesh is loaded in two fresh pairs of processes: once
as the loader does ("rows": tensors that fsdp splits along HF's inner dim are read as blocks of HF
rows and resharded on device) and once with that turned off ("blocks": every device reads its
target block, which spans all HF rows). Reported per process: the bytes of the HF slices it
requested (``_read_block`` wrapped here; counted as whole HF rows, the pages a block spans) and the
pages of the safetensors mapping resident in the process when the file is closed (``Rss`` of the
mapping in ``/proc/self/smaps``), each over the checkpoint's bytes (the baseline: 1.0 is one whole
checkpoint per host; 0.5 is the ideal for 2), and the load time.

    python bench/import_reads.py [--meshes=fsdp=8,data=2:fsdp=4] [--scan_layers]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import host  # noqa: E402

# ~100M parameters: (hidden, layers, intermediate, heads, kv heads); vocabulary 32000, untied.
HIDDEN, LAYERS, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 768, 8, 2048, 12, 4, 32000
DEVICES = 8
PROCESSES = 2


def config(scan_layers: bool):
    from alignjax.models.presets import PRESETS

    return PRESETS["tiny"].replace(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        intermediate_size=INTERMEDIATE,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        tie_word_embeddings=False,
        param_dtype="float32",
        dtype="float32",
        scan_layers=scan_layers,
    )


def save(path: str) -> int:
    """The checkpoint, written from one process; returns its tensor bytes."""
    import jax

    from alignjax.models import Model, save_pretrained

    model = Model(config(False))
    params = model.init(jax.random.PRNGKey(0))
    save_pretrained(model, params, path, dtype="float32")
    return sum(x.size * 4 for x in jax.tree.leaves(params))


def resident_bytes(file: str) -> int:
    """Resident bytes of this process's mappings of ``file``."""
    target, total, inside = os.path.realpath(file), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                inside = len(fields) >= 6 and fields[5] == target
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def child(args: argparse.Namespace) -> None:
    import jax

    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=PROCESSES, process_id=args.process_id
    )
    from alignjax import sharding
    from alignjax.models import from_pretrained, hf

    requested = [0]
    resident: dict[str, int] = {}
    real_read_block, real_open = hf._read_block, hf.open_safetensors

    class Counted:
        def __init__(self, tensor):
            self.tensor = tensor

        def __getitem__(self, index):
            block = self.tensor[index]  # counted as whole HF rows: the pages a block spans
            shape = self.tensor.get_shape()
            rows = len(range(*index[0].indices(shape[0]))) if shape else 1
            requested[0] += rows * block.itemsize * math.prod(shape[1:])
            return block

    @contextlib.contextmanager
    def measured_open(file: str):
        with real_open(file) as f:
            yield f
            resident[file] = max(resident.get(file, 0), resident_bytes(file))

    hf._read_block = lambda tensor, m, index: real_read_block(Counted(tensor), m, index)
    hf.open_safetensors = measured_open
    if args.mode == "blocks":
        hf._row_sharding = lambda *a, **k: None
    axes = dict((k, int(v)) for k, v in (kv.split("=") for kv in args.mesh.split(":")))
    mesh = sharding.make_mesh(axes)
    t0 = time.perf_counter()
    model = from_pretrained(args.path, mesh=mesh, scan_layers=args.scan_layers)
    jax.block_until_ready(model.params)
    seconds = time.perf_counter() - t0
    result = dict(
        mesh=args.mesh, mode=args.mode, process=jax.process_index(), requested=requested[0],
        resident=sum(resident.values()), load_s=round(seconds, 1),
    )  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)
    jax.distributed.shutdown()


def launch(path: str, mesh: str, mode: str, scan_layers: bool) -> list[dict]:
    results = host.run_children(
        __file__,
        PROCESSES,
        lambda i, address: [f"--path={path}", f"--mesh={mesh}", f"--mode={mode}", f"--process_id={i}"]
        + [f"--coordinator={address}"]
        + ["--scan_layers"] * scan_layers,
        devices_per_process=DEVICES // PROCESSES,
        timeout=600,
    )
    return sorted(results, key=lambda r: r["process"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meshes", default="fsdp=8,data=2:fsdp=4")
    parser.add_argument("--scan_layers", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="", help=argparse.SUPPRESS)
    parser.add_argument("--mesh", default="", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="rows", help=argparse.SUPPRESS)
    parser.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    host.print_header()
    with tempfile.TemporaryDirectory() as path:
        checkpoint = save(path)
        print(f"checkpoint: {checkpoint / 1e6:.0f} MB fp32 ({checkpoint // 4 / 1e6:.0f}M parameters)")
        print("| mesh | read as | process | requested / checkpoint | resident / checkpoint | load s |")
        print("|---|---|---|---|---|---|")
        for mesh in args.meshes.split(","):
            for mode in ("blocks", "rows"):
                for r in launch(path, mesh, mode, args.scan_layers):
                    cells = (
                        mesh.replace(":", ","), mode, r["process"], f"{r['requested'] / checkpoint:.3f}",
                        f"{r['resident'] / checkpoint:.3f}", r["load_s"],
                    )  # fmt: skip
                    print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
