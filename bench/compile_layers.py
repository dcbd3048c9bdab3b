"""DPO-step compile time and StableHLO size against depth: unrolled layers vs ``scan_layers``.

For each depth (``--layers``, default 2 / 8 / 32) and layout, the jitted DPO train step (policy
forward and backward, frozen-reference forward, AdamW, clipping; built as ``bench/common.py``'s
``JaxDPO`` builds it, with ``logprobs.strict_rounding``) is traced and lowered to StableHLO, then
compiled by XLA, on abstract state (no parameters are allocated, so depth costs no memory). Each
configuration is measured ``--repeats`` times round-robin (load drift hits all alike) and the
fastest kept; times are reported as ratios against the same layout's shallowest depth, and the
scanned step against the unrolled one at the same depth. No persistent compilation cache.

    .venv/bin/python bench/compile_layers.py                          # width 512, 2 / 8 / 32 layers
    .venv/bin/python bench/compile_layers.py --layouts=scan --repeats=5            # scan only
    .venv/bin/python bench/compile_layers.py --layers=2,4 --width=128 --repeats=1  # smoke

The step runs on an 8-device CPU mesh (``--devices``; data-parallel, ``--mesh`` to change), the setup
of issue 13's unrolled figures. One JSON line (``JSON ...``) closes the output.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,8,32", help="comma-separated depths; the first is the baseline")
    ap.add_argument("--width", type=int, default=512, help="hidden size (head dim 64, MLP 2.6875x)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--length", type=int, default=128, help="tokens per sequence (prompt + completion)")
    ap.add_argument("--remat", default="none", help="ModelConfig.remat of both layouts")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layouts", default="unrolled,scan", help="which layouts to measure")
    ap.add_argument("--devices", type=int, default=8, help="CPU devices (XLA host platform)")
    ap.add_argument("--mesh", default='{"data": -1}', help="config.mesh as JSON")
    return ap


def build_step(args: argparse.Namespace, num_layers: int, scan: bool) -> tuple[Any, Any, Any]:
    """``(jitted step, abstract state, batch)`` for one depth and layout."""
    import jax
    import optax

    from alignjax import logprobs, sharding
    from alignjax.models import PRESETS, Model
    from alignjax.train.reference import stored_reference
    from alignjax.train.step import StepSpec, make_train_step
    from bench import common as bc

    heads = max(1, args.width // 64)
    cfg = PRESETS["bench-7m"].replace(
        vocab_size=args.vocab,
        hidden_size=args.width,
        num_heads=heads,
        num_kv_heads=max(1, heads // 2),
        head_dim=64,
        intermediate_size=int(args.width * 2.6875),
        num_layers=num_layers,
        remat=args.remat,
        scan_layers=scan,
    )
    mesh = sharding.make_mesh(json.loads(args.mesh))
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
    half = args.length // 2
    pairs = bc.synthetic_pairs(
        args.pairs, prompt_length=half, completion_length=args.length - half, vocab_size=args.vocab
    )
    host = bc.layout_batch(pairs, "padded", max_length=args.length)
    batch = bc.place(mesh, {k: v for k, v in host.items() if k != "label"})
    spec = StepSpec(
        loss="dpo",
        hyperparameters=(("beta", 0.1),),
        kind="pairwise",
        batch_size=args.pairs,
        reference="model",
    )
    step = jax.jit(
        make_train_step(model, spec, tx, schedule),
        donate_argnums=(0,),
        out_shardings=(shardings, None),
        compiler_options=dict(logprobs.strict_rounding(model.config.dtype)),
    )
    return step, state, batch


def measure(args: argparse.Namespace, num_layers: int, scan: bool) -> dict[str, float]:
    """Seconds to trace + lower, to compile, and the StableHLO text size, of one step."""
    import jax

    jax.clear_caches()
    step, state, batch = build_step(args, num_layers, scan)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - t0
    hlo_chars = len(lowered.as_text())
    t0 = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - t0
    return dict(lower_s=lower_s, compile_s=compile_s, total_s=lower_s + compile_s, hlo_chars=hlo_chars)


def main() -> None:
    args = parser().parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    from bench import common as bc
    from bench.host import lscpu_model

    depths = [int(x) for x in args.layers.split(",")]
    info = bc.machine()
    load = info.get("loadavg")
    print(f"machine: {lscpu_model()} ({info.get('cpus')} cores, loadavg {load}), jax {jax.__version__}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"date: {info['date']}")
    print(
        f"width {args.width}, vocab {args.vocab}, {args.pairs} pairs x {args.length} tokens, "
        f"remat {args.remat}, {len(jax.devices())} {jax.default_backend()} devices, mesh {args.mesh}"
    )
    layouts = [{"unrolled": False, "scan": True}[name] for name in args.layouts.split(",")]
    runs = [(n, scan) for n in depths for scan in layouts]
    # Why a warm-up: the process's first compiles pay one-time costs (XLA and LLVM set-up) that
    # would otherwise land on whichever configuration happens to run first.
    for scan in layouts:
        measure(args, 1, scan)
    best: dict[tuple[int, bool], dict[str, float]] = {}
    for _ in range(args.repeats):
        for n, scan in runs:
            r = measure(args, n, scan)
            old = best.get((n, scan))
            if old is None or r["total_s"] < old["total_s"]:
                best[(n, scan)] = r
            print(f"  {n:3d} layers {'scan' if scan else 'unrolled':8s}: {r['total_s']:.1f} s", flush=True)
    base_name = f"vs {depths[0]}-layer"
    print(
        f"| layers | layout | lower s | compile s | total s | {base_name} | StableHLO chars | {base_name} "
        "| scan/unrolled |"
    )
    print("|" + "---|" * 9)
    rows = []
    for n, scan in runs:
        r, base = best[(n, scan)], best[(depths[0], scan)]
        unrolled = best.get((n, False))
        vs_unrolled = f"{r['total_s'] / unrolled['total_s']:.2f}x" if scan and unrolled else ""
        print(
            f"| {n} | {'scan' if scan else 'unrolled'} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
            f"{r['total_s']:.1f} | {r['total_s'] / base['total_s']:.2f}x | {r['hlo_chars'] / 1e6:.2f} M | "
            f"{r['hlo_chars'] / base['hlo_chars']:.2f}x | {vs_unrolled} |"
        )
        rows.append(dict(layers=n, scan=scan, **r))
    print("JSON " + json.dumps(dict(machine=lscpu_model(), args=vars(args), date=info["date"], rows=rows)))


if __name__ == "__main__":
    main()
