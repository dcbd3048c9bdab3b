"""The DPO-step benchmark on one accelerator: a 1B Llama-shape model (``llama3-1b``) at 2048 tokens, bf16.

alignjax's jitted step (fp32 master weights, bf16 compute, reference forward) and, where PyTorch
with CUDA is importable, the PyTorch/TRL step beside it (``torch.autocast(bfloat16)``, fused AdamW,
SDPA attention) on the same weights and batch, interleaved in one process; then a kernel-level
profile of the alignjax step (``jax.profiler`` trace: device time by kernel category, top kernels)
and, time permitting, a per-component timing (forward to hidden states, forward to log-probs,
forward+backward): together they say where the step time goes. The JAX side uses no CUDA-specific call and
runs unchanged on TPU (PyTorch is then skipped). Results: stdout and ``--out``/gpu_dpo_step.json.

    python3 bench/gpu_dpo_step.py --out=$OUT                 # GPU machine, about 3-5 minutes
    python3 bench/gpu_dpo_step.py --out=$OUT --variants=excess-precision,fp32-reference
    .venv/bin/python bench/gpu_dpo_step.py --smoke            # CPU: the same code on a 2-layer model

Other flags are those of ``bench/dpo_step.py`` (``--pairs``, ``--remat``, ``--vocab-chunk``, ...).
"""

from __future__ import annotations

import os

# PyTorch shares the device with XLA in this process: let XLA grow its pool instead of taking 75%.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from alignjax import flops, logprobs  # noqa: E402
from bench import common as bc  # noqa: E402
from bench import dpo_step  # noqa: E402

SMOKE = dict(
    overrides=json.dumps(
        dict(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            intermediate_size=128,
            vocab_size=512,
        )
    ),
    length=64,
    pairs=2,
    rounds=1,
    steps=1,
)


def timed(fn: Any, *args: Any, repeats: int = 3) -> float:
    """Median seconds of ``fn(*args)`` after one warm-up call (compile)."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


# Device-kernel categories of the profile, matched in order on the lower-cased kernel name.
KERNEL_CATEGORIES = (
    ("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa")),
    ("matmul (cuBLAS/cutlass/triton gemm)", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("memcpy/memset", ("memcpy", "memset")),
    ("copy/transpose fusions", ("copy", "transpose")),
    ("reduction fusions", ("reduce", "input_")),
)


def kernel_summary(trace_path: str, steps: int) -> dict[str, Any]:
    """Device time per step by kernel category and the top kernels, from a ``jax.profiler`` perfetto
    trace: ``X`` events of the processes named like a device (``/device:GPU:0``: its streams' kernels;
    TPU: the "XLA Ops" line), per step.
    ``busy`` sums kernel durations, ``span`` is first start to last end (busy < span: idle gaps)."""
    import gzip
    from collections import Counter

    with gzip.open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M" and e["name"] == "process_name"]
    names = {e["pid"]: e["args"]["name"] for e in meta}
    device = {pid for pid, n in names.items() if "device:" in n.lower() and "host" not in n.lower()}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e["name"] == "thread_name" and e["pid"] in device
    }
    # TPU device processes also carry "XLA Modules" / "Steps" lines over the same time: keep the ops.
    ops = {key for key, name in threads.items() if name == "XLA Ops"}
    kernels = [
        e
        for e in events
        if e.get("ph") == "X" and e["pid"] in device and (not ops or (e["pid"], e.get("tid")) in ops)
    ]
    if not kernels:  # XLA:CPU (the smoke run): its thunks, which name the HLO op they run
        kernels = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    total, count, by_cat = Counter(), Counter(), Counter()
    for e in kernels:
        total[e["name"]] += e["dur"] / 1e3 / steps
        count[e["name"]] += 1
    for name, ms in total.items():
        low = name.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other fusions")
        by_cat[cat] += ms
    span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / 1e3 / steps
    return dict(
        device_processes=[names[p] for p in device],
        kernels_per_step=len(kernels) / steps,
        busy_ms_per_step=sum(total.values()),
        span_ms_per_step=span,
        categories_ms=dict(by_cat.most_common()),
        top_kernels=[(n, round(ms, 3), count[n] // steps) for n, ms in total.most_common(40)],
    )


def profile(bench: dpo_step.Bench, out: str, steps: int = 2) -> dict[str, Any]:
    """A ``jax.profiler`` trace of ``steps`` alignjax steps, summarised by :func:`kernel_summary`;
    the trace (``trace.json.gz``) and the step's optimised HLO (``step_hlo.txt.gz``, for mapping kernel
    names to the model's ops) are written to ``out``."""
    import glob
    import gzip
    import shutil
    import tempfile

    runner = bench.main_runner
    with gzip.open(os.path.join(out, "step_hlo.txt.gz"), "wt") as f:
        f.write(runner.compiled.as_text())
    runner.step()
    runner.sync()
    directory = tempfile.mkdtemp(prefix="dpo_trace_")
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(steps):
            runner.step()
        runner.sync()
    (path,) = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
    if os.path.getsize(path) < 15 * 2**20:
        shutil.copy(path, os.path.join(out, "trace.json.gz"))
    summary = kernel_summary(path, steps)
    print("kernel profile per step: " + json.dumps({k: v for k, v in summary.items() if k != "top_kernels"}))
    for name, ms, n in summary["top_kernels"][:25]:
        print(f"  {ms:8.3f} ms  x{n:<4d} {name[:110]}")
    return summary


def sequence_batch(bench: dpo_step.Bench) -> tuple[dict[str, jax.Array], int]:
    """The benchmark batch as one (un-stacked) sequence batch on a data-parallel mesh, and its
    number of sequences (chosen + rejected): what the policy pieces below are timed on."""
    host = bench.host
    mesh = bc.sharding.make_mesh({"data": -1})
    batch = bc.place(mesh, {k: v for k, v in host.items() if k != "label"}, stacked=False)
    return batch, 2 * len(host["chosen_lengths"])


def numerics(bench: dpo_step.Bench, options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-sequence log-probs of the benchmark batch at the initial params, as the train step computes
    them: the policy forward (under ``grad``) and the reference forward (the bf16-stored reference)
    in one program, compiled with each entry of ``options`` (XLA compiler options); and the fp32
    forward of the same params (compute dtype fp32), the yardstick for both."""
    from alignjax.models import Model
    from alignjax.train.reference import stored_reference

    m = bench.main_model
    batch, n = sequence_batch(bench)
    ref_params = jax.jit(lambda p: stored_reference(p, m.config.dtype))(m.params)

    def seq_logps(model: Any, params: Any) -> jax.Array:
        return logprobs.batch_sequence_logps(model, params, batch, n)[0]

    def policy_and_reference(params: Any, ref: Any) -> tuple[jax.Array, jax.Array]:
        def objective(p: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            policy, reference = seq_logps(m, p), jax.lax.stop_gradient(seq_logps(m, ref))
            return jnp.sum(policy - reference), (policy, reference)

        return jax.grad(objective, has_aux=True)(params)[1]

    m32 = Model(m.config.replace(dtype="float32"), mesh=m.mesh)
    exact = np.asarray(jax.jit(lambda p: seq_logps(m32, p))(m.params), np.float64)
    out: dict[str, Any] = {"fp32": exact.tolist()}
    for name, opts in options.items():
        fn = jax.jit(policy_and_reference, compiler_options=opts)
        policy, reference = (np.asarray(x, np.float64) for x in fn(m.params, ref_params))
        out[name] = dict(
            policy=policy.tolist(),
            reference=reference.tolist(),
            policy_minus_reference=(policy - reference).tolist(),
            policy_minus_fp32=(policy - exact).tolist(),
            reference_minus_fp32=(reference - exact).tolist(),
        )
        print(f"  log-probs {name}: " + json.dumps(out[name]), flush=True)
    return out


def components(bench: dpo_step.Bench, step_s: float) -> dict[str, float]:
    """Where the alignjax step's time goes: forward to hidden states, forward to per-sequence
    log-probs (the difference is the unembedding matmul + log-softmax), forward+backward of the
    policy; the rest of the step (reference forward ~ one forward, loss, AdamW) by difference."""
    m = bench.main_model
    batch, n = sequence_batch(bench)
    chunk = bench.args.vocab_chunk
    hidden = jax.jit(
        lambda p, b: m.hidden(p, b["input_ids"], positions=b["positions"], segment_ids=b["segment_ids"])
    )
    fwd = jax.jit(lambda p, b: logprobs.batch_sequence_logps(m, p, b, n, vocab_chunk=chunk)[0])
    grad = jax.jit(
        jax.grad(lambda p, b: logprobs.batch_sequence_logps(m, p, b, n, vocab_chunk=chunk)[0].sum())
    )
    out = {"step_s": step_s}
    for name, fn in (("forward_hidden_s", hidden), ("forward_logps_s", fwd), ("forward_backward_s", grad)):
        if bench.deadline is not None and time.time() > bench.deadline + bench.args.profile_grace_s:
            break
        out[name] = timed(fn, m.params, batch)
        print(f"  {name}: {out[name]:.4f}", flush=True)
    if "forward_backward_s" in out:
        out["lm_head_logsoftmax_fwd_s"] = out["forward_logps_s"] - out["forward_hidden_s"]
        out["backward_s"] = out["forward_backward_s"] - out["forward_logps_s"]
        out["rest_s (ref forward + loss + AdamW + clip)"] = step_s - out["forward_backward_s"]
        out["rest_minus_one_forward_s (loss + AdamW + clip)"] = (
            step_s - out["forward_backward_s"] - out["forward_logps_s"]
        )
    return out


def main() -> None:
    ap = dpo_step.parser()
    ap.set_defaults(
        preset="llama3-1b",
        pairs=1,
        length=2048,
        dtype="bfloat16",
        groups="main",
        no_cached_torch=True,
        no_cached_jax=True,
        weights="memory",
        rounds=4,
        steps=3,
        budget_s=240.0,
        lr=5e-7,
        # the head at every position, as the recorded H200 figures; -1 adds the counted-only rows
        # (alignjax's logit_width, TRL's use_logits_to_keep), not yet measured on a GPU
        max_completion_length=0,
    )
    ap.add_argument("--smoke", action="store_true", help="tiny 2-layer llama3-1b-shaped model (CPU check)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-profile", action="store_true", help="skip the per-component timing")
    ap.add_argument("--trace-steps", type=int, default=2, help="steps in the kernel profile (0 = none)")
    ap.add_argument("--numerics", action="store_true", help="policy / reference / fp32 log-probs")
    ap.add_argument(
        "--numerics-xla", default="", help="extra XLA options probed, e.g. xla_gpu_autotune_level=0"
    )
    ap.add_argument("--profile-grace-s", type=float, default=60.0)
    args = ap.parse_args()
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    t_start = time.time()
    kind = jax.devices()[0].device_kind
    backend = jax.default_backend()
    if not args.peak_tflops:
        args.peak_tflops = (flops.peak_flops_per_device(kind) or 0.0) / 1e12
        args.peak_dtype, args.peak_size = ("bfloat16", 8192) if backend != "cpu" else ("float32", 1024)
    torch_ok = False
    try:
        import torch

        torch_ok = backend == "cpu" or (backend == "gpu" and torch.cuda.is_available())
        args.torch_device = "cuda" if backend == "gpu" else "cpu"
        print(f"torch {torch.__version__}, device {args.torch_device}", flush=True)
    except ImportError as e:
        print(f"PyTorch baseline could not run: {e}", flush=True)
    if not torch_ok:
        args.no_torch = True
    measured = bc.matmul_peak(args.peak_dtype, args.peak_size) if backend != "cpu" else None
    if measured:
        print(
            f"measured {args.peak_dtype} {args.peak_size}^3 matmul: {measured / 1e12:.1f} TFLOP/s", flush=True
        )
    bench = dpo_step.Bench(args)
    report: dict[str, Any] = dict(
        machine=bench.info,
        args=vars(args),
        results=bench.results,
        device_kind=kind,
        measured_matmul_flops=measured,
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_dpo_step.json")
    try:
        bench.run()
    except Exception:  # noqa: BLE001  (keep whatever was measured)
        import traceback

        report["error"] = traceback.format_exc()
        print(report["error"], flush=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        raise
    main_rows = {r["variant"]: r for r in bench.results[0]["rows"]}
    aj = main_rows["alignjax"]
    print(
        f"\nalignjax DPO step: {aj['step_s']:.4f} s, {aj['tokens_per_s']:.0f} tokens/s, "
        f"MFU {100 * aj['mfu']:.1f}% of {bench.peak / 1e12:.1f} TFLOP/s",
        flush=True,
    )
    if measured:
        print(f"  = {100 * aj['achieved_tflop_per_s'] * 1e12 / measured:.1f}% of the measured matmul rate")
    if "pytorch" in main_rows:
        print(
            f"alignjax / pytorch tokens/s: {aj['tokens_per_s'] / main_rows['pytorch']['tokens_per_s']:.2f}x"
        )
    else:
        print("PyTorch baseline could not run here (no torch with this accelerator)")
    if args.numerics:
        print("log-probs at the initial params (policy under grad, bf16 reference, fp32):", flush=True)
        probes = {"strict": logprobs.STRICT_ROUNDING, "xla-default": {}}
        probes.update(
            {
                f"strict+{o}": dict(
                    logprobs.STRICT_ROUNDING, **dpo_step.variant_options(f"xla:{o}")["compiler_options"]
                )
                for o in filter(None, args.numerics_xla.split(","))
            }
        )
        report["numerics"] = numerics(bench, probes)
    if args.trace_steps:
        try:
            report["kernels"] = profile(bench, args.out, args.trace_steps)
        except Exception:  # noqa: BLE001  (the timings above stand without it)
            import traceback

            report["profile_error"] = traceback.format_exc()
            print(report["profile_error"], flush=True)
    if not args.no_profile:
        import gc

        gc.collect()
        if torch_ok and args.torch_device == "cuda":
            torch.cuda.empty_cache()
        print("component timing (alignjax policy, same batch):", flush=True)
        report["components"] = components(bench, aj["step_s"])
    report["wall_s"] = time.time() - t_start
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print("JSON " + json.dumps(report.get("components", {})))
    print(f"wall {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
