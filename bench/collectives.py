"""Collectives of the sharded DPO step: what XLA emits against what the parallelism needs.

For each mesh shape (``--meshes``; default the four standard ones: ``data=8``, ``fsdp=8``,
``data=2,fsdp=2,tensor=2``, ``fsdp=4,tensor=2``) the DPO train step (policy forward and backward,
frozen-reference forward, AdamW, clipping; built as ``alignjax.train.loop.run_train`` builds it, with
``logprobs.strict_rounding``) is compiled on abstract state for ``--devices`` CPU devices (XLA's
host platform), and the compiled HLO's all-gather / all-reduce / reduce-scatter / all-to-all /
collective-permute ops are counted with their bytes: the result each device holds ("payload") and
what a ring moves per device ("wire": all-gather and all-to-all ``(n-1)/n`` of the result,
all-reduce ``2(n-1)/n``, reduce-scatter ``n-1`` times the shard, a permute its result). Ops inside a
loop body count once per iteration (XLA's ``known_trip_count``).

Each row sits next to the budget the parallelism needs (:func:`budget`, payload bytes):

* fsdp: each fsdp-sharded weight all-gathered for the policy forward, again for its backward, and
  once for the reference forward, except the embedding table, which stays where it is (its lookup
  all-gathers the token ids and all-to-alls the looked-up rows: ``transformer.embed_lookup``);
  each gradient reduced over the batch axes once. XLA:CPU writes
  that reduce-scatter as an all-reduce of the whole (tensor-local) gradient and a slice (GPU/TPU
  turn the pair into a reduce-scatter), then all-reduces the fsdp shard over ``data``;
* data: one all-reduce of every gradient;
* tensor: per layer, the two Megatron activation all-reduces (after ``o_proj`` and ``down_proj``)
  in the policy and the reference forward, five in the backward (one per column-parallel
  projection's input gradient: q, k, v, gate, up; a fused qkv / gate-up matmul would need two),
  the vocab-parallel embedding's psum in each forward and the LM head's input gradient;
* small: per-token log-softmax statistics and scalars (loss, norms, finiteness flags);
* all-to-all: the embedding's rows only; reduce-scatter (on CPU) and collective-permute: none.

XLA's "Involuntary full rematerialization" warnings (a resharding the partitioner could only do by
replicating the array) are captured from its stderr during each compile and counted.

    .venv/bin/python bench/collectives.py                               # bench-7m, 8 pairs x 128 tokens
    .venv/bin/python bench/collectives.py --preset=tiny --layers=1 --pairs=4 --length=16 \
        --meshes="fsdp=8;data=2,fsdp=2,tensor=2" --xla-defaults --overrides='{"scan_layers": true}'  # smoke

``--overrides`` sets ``ModelConfig`` fields (remat, scan_layers, widths); each mesh's line also gives
the compiled step's temporaries a device (XLA's memory analysis).

One JSON line (``JSON ...``) closes the output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
STANDARD_MESHES = "data=8;fsdp=8;data=2,fsdp=2,tensor=2;fsdp=4,tensor=2"
REMAT_WARNING = "Involuntary full rematerialization"
MiB = 2**20

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) (" + "|".join(OPS) + r")(?:-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
_CALLS = re.compile(r"\b(?:body|to_apply|calls|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meshes", default=STANDARD_MESHES, help="';'-separated config.mesh shapes, axis=size")
    ap.add_argument("--preset", default="bench-7m", help="model preset (alignjax.models.PRESETS)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--length", type=int, default=128, help="tokens per sequence (prompt + completion)")
    ap.add_argument("--layers", type=int, default=0, help="override the preset's depth (0: keep)")
    ap.add_argument(
        "--overrides", default="", help='JSON ModelConfig fields, e.g. {"remat": "full", "scan_layers": true}'
    )
    ap.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
    ap.add_argument("--devices", type=int, default=8, help="CPU devices (XLA host platform)")
    ap.add_argument(
        "--xla-defaults",
        action="store_true",
        help="compile with XLA's default options, not logprobs.strict_rounding (same partitioning, faster)",
    )
    return ap


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` -> ``{"data": 2, "fsdp": 2, "tensor": 2}``."""
    out = {}
    for item in text.split(","):
        name, _, size = item.partition("=")
        if not size.strip().lstrip("-").isdigit():
            raise SystemExit(f"--meshes: {item!r} is not axis=size (e.g. data=2,fsdp=2,tensor=2)")
        out[name.strip()] = int(size)
    return out


# ---------------------------------------------------------------------------------- HLO counting


def _shape_bytes(text: str) -> int:
    shapes = _SHAPE.findall(text)
    return sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in shapes)


def _group_size(line: str, op: str) -> int:
    """Devices per replica group: ``{{0,2},{1,3}}``, iota ``[4,2]<=[8]`` or ``mesh[...] {'axis'}``."""
    if op == "collective-permute":
        return 2
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\([^)]*\))? \{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    return 0  # no groups: all devices (filled in by the caller)


def computation_multiplicity(hlo: str) -> dict[str, int]:
    """How many times each computation of a compiled module runs per call of its entry: a while
    body ``known_trip_count`` times its caller, other callees (calls, branches) once."""
    callers: dict[str, list[tuple[str, int]]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None or "=" not in line:
            continue
        trip = _TRIP.search(line)
        times = int(trip.group(1)) if trip and " while(" in line else 1
        names = _CALLS.findall(line)
        for group in _BRANCHES.findall(line):
            names += [n.strip().lstrip("%") for n in group.split(",")]
        for name in names:
            callers.setdefault(name, []).append((current, times))
    memo: dict[str, int] = {}

    def mult(name: str, depth: int = 0) -> int:
        if name == entry:
            return 1
        if name not in memo:
            memo[name] = 0 if depth > 200 else sum(mult(c, depth + 1) * t for c, t in callers.get(name, []))
        return memo[name]

    return {name: mult(name) for name in {*callers, entry} if name}


def count_collectives(hlo: str, num_devices: int) -> list[dict[str, Any]]:
    """Every collective of a compiled HLO module: ``op``, ``shape`` (its result's HLO shape),
    ``payload`` (result bytes per device), ``wire`` (ring bytes per device), ``group`` (devices per
    replica group) and ``times`` (runs per step). Groups of one device move nothing and are left
    out."""
    mult = computation_multiplicity(hlo)
    out, current = [], None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            continue
        m = _OP.match(line)
        if not m:
            continue
        shape, op = m.group(1), m.group(2)
        n = _group_size(line, op) or num_devices
        if n <= 1:
            continue
        payload = _shape_bytes(shape)
        if op == "all-reduce":
            wire = 2 * payload * (n - 1) / n
        elif op == "reduce-scatter":
            wire = payload * (n - 1)
        elif op == "collective-permute":
            wire = payload
        else:
            wire = payload * (n - 1) / n
        out.append(dict(op=op, shape=shape, payload=payload, wire=wire, group=n, times=mult.get(current, 1)))
    return out


def totals(collectives: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per op kind: ``count`` (ops run per step), ``payload`` and ``wire`` bytes per device."""
    out = {op: dict(count=0, payload=0.0, wire=0.0) for op in OPS}
    for c in collectives:
        t = out[c["op"]]
        t["count"] += c["times"]
        t["payload"] += c["payload"] * c["times"]
        t["wire"] += c["wire"] * c["times"]
    return out


# ----------------------------------------------------------------------------------------- budget


def budget(model: Any, mesh: Any, rows: int, length: int) -> dict[str, dict[str, float]]:
    """Payload bytes per device the step's parallelism needs, per op kind and part (module
    docstring): ``{"all-gather": {"fsdp weights": ...}, "all-reduce": {"gradients": ..., ...}}``."""
    import jax
    import jax.numpy as jnp

    from alignjax import sharding

    cfg = model.config
    sizes = dict(mesh.shape)
    d, f, t = (sizes[a] for a in sharding.MESH_AXES)
    pbytes, cbytes = jnp.dtype(cfg.param_dtype).itemsize, jnp.dtype(cfg.dtype).itemsize
    rows_local = rows / (d * f)
    gathered, grads, ids, swapped = 0.0, 0.0, 0.0, 0.0
    abstract = model.abstract_params()
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    for (path, leaf), shard in zip(flat, jax.tree.leaves(model.shardings(mesh))):
        axes = [a for entry in shard.spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
        other = math.prod(sizes[a] for a in axes if a not in sharding.BATCH_AXES)
        local = math.prod(leaf.shape) / other  # the leaf gathered over the batch axes, tensor-split
        split = any(sizes[a] > 1 for a in axes if a in sharding.BATCH_AXES)
        if jax.tree_util.keystr(path) == "['embedding']" and split:
            # The lookup moves ids and rows, not the table (transformer.embed_lookup): the ids
            # all-gathered and the rows all-to-all'd in both forwards, the rows' cotangent back.
            ids += 2 * rows_local * f * length * 4
            swapped += 3 * rows_local * length * cfg.hidden_size * pbytes
            grads += local / f * pbytes if d > 1 else 0
            if not cfg.tie_word_embeddings:
                continue
        if split:
            gathered += local * (2 * pbytes + cbytes)  # policy forward + backward, reference forward
        if f > 1:  # all-reduce of the tensor-local gradient over fsdp, then of its shard over data
            grads += local * pbytes * (1 + (1 / f if d > 1 else 0))
        elif d > 1:
            grads += local * pbytes
    activation = rows_local * length * cfg.hidden_size
    L = cfg.num_layers
    tensor = 0.0
    if t > 1:
        forward = 2 * L * cbytes + pbytes  # two per layer + the embedding's psum (param dtype)
        tensor = activation * (2 * forward + 5 * L * cbytes + cbytes)
    small = 0.0
    if d * f * t > 1:  # log-softmax statistics (max, sum, target) fwd and bwd, and scalars
        small = 16 * rows_local * length * 4 + 64 * len(flat) * 4 + 4096
    return {
        "all-gather": {"fsdp weights": gathered, "embedding ids": ids},
        "all-reduce": {"gradients": grads, "tensor activations": tensor, "small": small},
        "reduce-scatter": {},
        "all-to-all": {"embedding rows": swapped},
        "collective-permute": {},
    }


# ------------------------------------------------------------------------------------- compiling


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collects what is written to file descriptor 2 (XLA's C++ log) while the block runs, and
    writes it through to the real stderr afterwards."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            lines.extend(text.splitlines())
            sys.stderr.write(text)


def compile_step(
    preset: str | Any,
    mesh_sizes: dict[str, int],
    *,
    pairs: int,
    length: int,
    dtype: str = "float32",
    strict: bool = True,
    logit_width: int | None = None,
) -> dict[str, Any]:
    """Compiles the DPO step on ``mesh_sizes`` over the process's devices (abstract state, no
    parameters allocated); ``preset`` is a preset name or a ``ModelConfig``; ``strict=False``
    compiles with XLA's default options instead of ``logprobs.strict_rounding`` (the same SPMD
    partitioning, a faster backend compile); ``logit_width``: the step's head at the counted tokens
    only (``StepSpec.logit_width``). Returns ``hlo`` (compiled text), ``warnings`` (XLA's
    full-remat lines), ``compile_s``, ``temp_bytes`` (XLA's memory analysis: the temporaries a device
    holds), ``model``, ``mesh`` and ``rows``."""
    import jax
    import optax

    from alignjax import logprobs, sharding
    from alignjax.data.batching import make_batch
    from alignjax.data.tokenize import TokenizedExample
    from alignjax.models import PRESETS, Model
    from alignjax.train.reference import stored_reference
    from alignjax.train.step import StepSpec, make_train_step

    cfg = (PRESETS[preset] if isinstance(preset, str) else preset).replace(dtype=dtype)
    mesh = sharding.make_mesh(mesh_sizes)
    model = Model(cfg, mesh=mesh)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    schedule = optax.constant_schedule(1e-3)

    def init(params: Any) -> dict[str, Any]:
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jax.numpy.zeros((), jax.numpy.int32),
            "rng": jax.random.PRNGKey(0),
            "ref_params": stored_reference(params, cfg.dtype),
        }

    param_shardings = model.shardings()
    repl = sharding.replicated(mesh)
    abstract = jax.eval_shape(init, model.abstract_params())
    shardings = {
        "params": param_shardings,
        "opt_state": optax.tree_map_params(
            tx, lambda _, s: s, abstract["opt_state"], param_shardings, transform_non_params=lambda _: repl
        ),
        "step": repl,
        "rng": repl,
        "ref_params": param_shardings,
    }
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    half = length // 2
    examples = [
        TokenizedExample(
            prompt=[1 + (i + j) % (cfg.vocab_size - 1) for j in range(half)],
            completions=[[2 + (i + j) % (cfg.vocab_size - 2) for j in range(length - half)]] * 2,
            extras={},
            where=f"pair:{i}",
        )
        for i in range(pairs)
    ]
    host = make_batch(examples, "padded", pad_id=0, buckets=(length,))
    batch = {}
    for key, value in host.items():
        if key == "label":
            continue
        spec = jax.sharding.PartitionSpec(None, sharding.BATCH_AXES, *([None] * (value.ndim - 1)))
        where = jax.NamedSharding(mesh, spec)
        batch[key] = jax.ShapeDtypeStruct((1, *value.shape), value.dtype, sharding=where)
    spec = StepSpec(
        loss="dpo", hyperparameters=(("beta", 0.1),), kind="pairwise", batch_size=pairs, reference="model",
        logit_width=logit_width,
    )
    step = jax.jit(
        make_train_step(model, spec, tx, schedule),
        donate_argnums=(0,),
        out_shardings=(shardings, None),
        compiler_options=dict(logprobs.strict_rounding(model.config.dtype)) if strict else {},
    )
    lowered = step.lower(state, batch)
    t0 = time.perf_counter()
    with captured_stderr() as log:
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    warnings = [line for line in log if REMAT_WARNING in line]
    rows = host["input_ids"].shape[0]
    hlo = compiled.as_text()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    return dict(
        hlo=hlo, warnings=warnings, compile_s=compile_s, temp_bytes=temp_bytes, model=model, mesh=mesh,
        rows=rows,
    )  # fmt: skip


def measure(
    preset: str | Any,
    mesh_sizes: dict[str, int],
    *,
    pairs: int,
    length: int,
    dtype: str = "float32",
    strict: bool = True,
) -> dict[str, Any]:
    """One mesh: measured totals per op kind, the budget, the warnings and the compile time
    (arguments as :func:`compile_step`)."""
    import jax

    r = compile_step(preset, mesh_sizes, pairs=pairs, length=length, dtype=dtype, strict=strict)
    measured = totals(count_collectives(r["hlo"], len(jax.devices())))
    need = budget(r["model"], r["mesh"], r["rows"], length)
    return dict(
        mesh=dict(r["mesh"].shape),
        measured=measured,
        budget={op: sum(parts.values()) for op, parts in need.items()},
        budget_parts=need,
        warnings=len(r["warnings"]),
        warning_lines=[w[:300] for w in r["warnings"]],
        compile_s=r["compile_s"],
        temp_bytes=r["temp_bytes"],
    )


def over_budget(result: dict[str, Any]) -> list[str]:
    """The op kinds whose measured payload exceeds the budget (empty: within budget)."""
    return [
        f"{op}: {m['payload'] / MiB:.3f} MiB > budget {result['budget'][op] / MiB:.3f} MiB"
        for op, m in result["measured"].items()
        if m["payload"] > result["budget"][op] * 1.0001 + 1
    ]


def main() -> None:
    args = parser().parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    # A compile served from a persistent cache would print no partitioner warnings.
    jax.config.update("jax_enable_compilation_cache", False)
    from alignjax.models import PRESETS
    from bench.host import print_header

    if args.preset not in PRESETS:
        raise SystemExit(f"--preset={args.preset!r} is not a preset; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[args.preset]
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    if args.overrides:
        cfg = cfg.replace(**json.loads(args.overrides))
    meshes = [parse_mesh(m) for m in args.meshes.split(";") if m.strip()]
    print_header()
    print(
        f"model {args.preset} ({cfg.num_layers} layers, {args.dtype} compute, remat {cfg.remat}, "
        f"{'scanned' if cfg.scan_layers else 'unrolled'}), {args.pairs} pairs x "
        f"{args.length} tokens, "
        f"{len(jax.devices())} {jax.default_backend()} devices, jax {jax.__version__}"
    )
    results = []
    for sizes in meshes:
        r = measure(
            cfg, sizes, pairs=args.pairs, length=args.length, dtype=args.dtype, strict=not args.xla_defaults
        )
        results.append(r)
        name = ",".join(f"{a}={s}" for a, s in r["mesh"].items() if s > 1) or "1 device"
        print(
            f"\nmesh {name}: compile {r['compile_s']:.1f} s, temporaries {r['temp_bytes'] / MiB:.1f} MiB a "
            f"device, full-remat warnings: {r['warnings']}, "
            f"{'within budget' if not over_budget(r) else 'OVER budget: ' + '; '.join(over_budget(r))}"
        )
        print("| collective | count | payload MiB | wire MiB | budget MiB | payload / budget |")
        print("|---|---|---|---|---|---|")
        for op in OPS:
            m, b = r["measured"][op], r["budget"][op]
            ratio = f"{m['payload'] / b:.2f}" if b else ("0" if not m["payload"] else "inf")
            print(
                f"| {op} | {m['count']} | {m['payload'] / MiB:.3f} | {m['wire'] / MiB:.3f} | {b / MiB:.3f} "
                f"| {ratio} |"
            )
        parts = "; ".join(
            f"{part} {v / MiB:.3f}" for op in OPS for part, v in r["budget_parts"][op].items() if v
        )
        print(f"budget parts (MiB): {parts or 'none'}")
        for line in r["warning_lines"]:
            print(f"  warning: {line}")
    summary = [
        {k: v for k, v in r.items() if k != "warning_lines"} | {"over_budget": over_budget(r)}
        for r in results
    ]
    print("JSON " + json.dumps(dict(args=vars(args), results=summary)))


if __name__ == "__main__":
    main()
