"""DPO train-step throughput, memory and MFU: alignjax's jitted step against the PyTorch/TRL way.

Both sides start from the same weights (alignjax's random init, exported with
``alignjax.models.save_pretrained`` and loaded by ``transformers.LlamaForCausalLM.from_pretrained``)
and train on the same batch with the same optimizer (AdamW, clip 1.0, sigmoid DPO, beta 0.1); the
script checks that their first-step losses agree before it times anything. Steps are timed after a
warm-up, interleaved round-robin, in one process (see ``bench/common.py``). Groups (``--groups``):

* ``main``: alignjax vs PyTorch, with the reference forward and with precomputed reference log-probs
  then (``--variants``) alignjax's step with other settings or XLA options against its default;
* ``shared``: padded vs shared-prompt layout (the prompt computed once per pair);
* ``packing``: padded vs packed layout on length-skewed data (padded share reported);
* ``chunked``: dense vs vocabulary-chunked log-probs at a 128k vocabulary (``--chunk-pairs`` pairs);
* ``remat``: rematerialisation policies none / full / dots / dots_no_batch;
* ``bf16``: fp32 vs bf16 compute (fp32 master weights), and PyTorch autocast bf16 beside it.

    .venv/bin/python bench/dpo_step.py                         # all groups, bench-7m, 8 pairs x 256, fp32
    .venv/bin/python bench/dpo_step.py --groups=main --rounds=5
    .venv/bin/python bench/dpo_step.py --preset=tiny --pairs=2 --length=32 --groups=main   # smoke

Threads: PyTorch gets ``torch.set_num_threads(--threads)`` (default: all cores, 2 here); XLA:CPU uses
all cores. Figures are recorded in docs/benchmarks.md. One JSON line per group is printed (``JSON ...``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alignjax import host_memory, logprobs  # noqa: E402
from alignjax.data.batching import counted_width  # noqa: E402
from bench import common as bc  # noqa: E402

# Named A/B variants of alignjax's step (``--variants``): ``bench.common.JaxDPO`` keyword arguments.
VARIANTS: dict[str, dict[str, Any]] = {
    # XLA's default rounding (excess precision allowed) instead of logprobs.strict_rounding
    "excess-precision": dict(compiler_options={}),
    # the frozen reference stored in the param dtype (fp32) instead of the compute dtype
    "fp32-reference": dict(ref_dtype="param"),
}


def variant_options(variant: str, compute_dtype: str = "float32") -> dict[str, Any]:
    """``--variants`` entry -> ``JaxDPO`` keyword arguments (``xla:a=1+b=false`` adds XLA options to
    ``logprobs.strict_rounding(compute_dtype)``)."""
    if variant in VARIANTS:
        return VARIANTS[variant]
    if not variant.startswith("xla:"):
        raise ValueError(f"--variants: unknown {variant!r}; choose from {list(VARIANTS)} or xla:FLAG=VALUE")
    options = dict(logprobs.strict_rounding(compute_dtype))
    for item in variant[4:].split("+"):
        key, _, value = item.partition("=")
        parsed = int(value) if value.isdigit() else value
        options[key] = {"true": True, "false": False}.get(value.lower(), parsed)
    return dict(compiler_options=options)


def rss_peak_during(fn: Any) -> float:
    """Peak resident-set growth (GiB) while ``fn()`` runs, sampled every 2 ms (CPU PyTorch has no
    allocator statistics; indicative only)."""
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return (peak[0] - base) / bc.GiB


def torch_state_gib(runner: bc.TorchDPO) -> float:
    """Bytes of policy params + grads + AdamW moments + reference params (GiB)."""
    params = sum(p.numel() * p.element_size() for p in runner.policy.parameters())
    ref = 0 if runner.ref is None else sum(p.numel() * p.element_size() for p in runner.ref.parameters())
    return (4 * params + ref) / bc.GiB


class Bench:
    """Builds runners, times groups of them interleaved, and prints one table + JSON per group."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: list[dict[str, Any]] = []
        self.info = bc.machine()
        self.deadline = time.time() + args.budget_s if args.budget_s else None

    def model(self, dtype: str = "float32", compute: str | None = None, **overrides: Any) -> Any:
        from alignjax.models import PRESETS, Model

        extra = json.loads(self.args.overrides) if self.args.overrides else {}
        config = PRESETS[self.args.preset].replace(
            param_dtype=dtype, dtype=compute or dtype, **{**extra, **overrides}
        )
        model = Model(config)
        model.params = model.init(__import__("jax").random.PRNGKey(0))
        return model

    def pairs(self, **kw: Any) -> list:
        a = self.args
        prompt = kw.pop("prompt_length", a.length // 2)
        return bc.synthetic_pairs(
            kw.pop("num_pairs", a.pairs),
            prompt_length=prompt,
            completion_length=a.length - prompt,
            vocab_size=kw.pop("vocab_size", 0) or self.vocab,
            max_length=a.length,
            **kw,
        )

    def time_group(
        self, group: str, runners: dict[str, Any], meta: dict[str, dict[str, Any]], baseline: str
    ) -> dict[str, Any]:
        """Interleaved timing of ``runners``; rows with tokens/s, step time, memory, MFU, ratio."""
        a = self.args
        mem: dict[str, dict[str, float]] = {}
        for name, r in runners.items():  # warm-up step (torch: with its memory sampled)
            if isinstance(r, bc.TorchDPO):
                grow = rss_peak_during(lambda r=r: (r.step(), r.sync()))
                mem[name] = dict(state_gib=torch_state_gib(r), step_rss_growth_gib=grow)
                if r.device.startswith("cuda"):
                    mem[name]["peak_gib"] = r.torch.cuda.max_memory_allocated() / bc.GiB
            else:
                r.step()
                r.sync()
                mem[name] = r.memory()
        times = bc.interleave(runners, rounds=a.rounds, steps=a.steps, warmup=0, deadline=self.deadline)
        rows = []
        for name, r in runners.items():
            s = bc.summarize(times[name])
            m = meta[name]
            row = dict(
                variant=name,
                step_s=s["median_s"],
                min_step_s=s["min_s"],
                timed_steps=s["n"] * a.steps,
                tokens_per_s=m["tokens"] / s["median_s"],
                pairs_per_s=m["pairs"] / s["median_s"],
                model_tflops=m["flops"] / 1e12,
                achieved_tflop_per_s=m["flops"] / s["median_s"] / 1e12,
                mfu=m["flops"] / s["median_s"] / self.peak,
                peak_fraction=m["flops"] / s["median_s"] / self.peaks.get(m.get("peak"), float("nan")),
                padded_share=m.get("padded_share"),
                first_step=m.get("first"),
                compile_s=getattr(r, "compile_s", None),
                **mem[name],
            )
            rows.append(row)
        base = next(r for r in rows if r["variant"] == baseline)
        for row in rows:
            row["speedup_vs_" + baseline] = row["tokens_per_s"] / base["tokens_per_s"]
        self.print_group(group, rows, baseline)
        out = dict(group=group, baseline=baseline, rows=rows, loadavg=os.getloadavg())
        self.results.append(out)
        return out

    def print_group(self, group: str, rows: list[dict[str, Any]], baseline: str) -> None:
        print(f"\n== {group} (ratios against {baseline!r}; load average {os.getloadavg()[0]:.1f})")
        print(
            f"{'variant':<34} {'step s':>8} {'tok/s':>9} {'TFLOP':>7} {'MFU':>6} {'of peak':>7} "
            f"{'peak GiB':>9} {'pad %':>6} {'ratio':>6}"
        )
        for r in rows:
            peak = r.get("peak_gib", r.get("state_gib", float("nan")) + r.get("step_rss_growth_gib", 0.0))
            pad = "" if r["padded_share"] is None else f"{100 * r['padded_share']:.1f}"
            print(
                f"{r['variant']:<34} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {r['model_tflops']:7.3f} "
                f"{100 * r['mfu']:5.1f}% {100 * r['peak_fraction']:6.1f}% {peak:9.3f} {pad:>6} "
                f"{r['speedup_vs_' + baseline]:5.2f}x"
            )
        print("JSON " + json.dumps(dict(group=group, rows=rows), default=float))
        sys.stdout.flush()

    # ------------------------------------------------------------------------------------ groups

    def jax_runner(self, model: Any, host: dict, reference: str = "model", **kw: Any) -> tuple[Any, dict]:
        r = bc.JaxDPO(model, model.params, host, reference=reference, optim=self.optim, **kw)
        r.step()
        values = r.values()
        first = dict(loss=values["loss"], grad_norm=values["grad_norm"])
        meta = dict(
            tokens=bc.sequence_tokens(host),
            pairs=len(host["chosen_lengths"]),
            flops=bc.step_flops(model.config, host, reference_forward=reference == "model")["total"],
            padded_share=bc.padding_fraction(host),
            first=first,
            peak=("jax", model.config.dtype),
        )
        return r, meta

    def torch_runner(
        self, source: Any, host: dict, reference: str, amp: bool = False, logits_to_keep: bool = False
    ) -> tuple[Any, dict]:
        a = self.args
        r = bc.TorchDPO(
            source,
            host,
            device=a.torch_device,
            reference=reference,
            optim=self.optim,
            amp_bf16=amp,
            threads=a.threads,
            logits_to_keep=logits_to_keep,
        )
        meta = dict(
            tokens=bc.sequence_tokens(host),
            pairs=len(host["chosen_lengths"]),
            flops=bc.step_flops(self.main_model.config, host, reference_forward=reference == "model")[
                "total"
            ],
            padded_share=bc.padding_fraction(host),
            peak=("torch", "bfloat16" if amp else "float32"),
        )
        r.step()
        r.sync()
        meta["first"] = r.values()
        return r, meta

    def run(self) -> None:
        import jax

        a = self.args
        self.optim = bc.OptimConfig(learning_rate=a.lr)
        completion = a.length - a.length // 2  # the synthetic pairs' completion tokens (see pairs())
        cut = completion if a.max_completion_length < 0 else a.max_completion_length
        self.logit_width = counted_width("padded", cut) if 0 < cut < a.length else None
        dtype = "float32"
        compute = "bfloat16" if a.dtype == "bfloat16" else None
        self.main_model = self.model(dtype, compute, remat=a.remat)
        self.vocab = self.main_model.config.vocab_size
        self.peak = a.peak_tflops * 1e12 if a.peak_tflops else bc.matmul_peak(a.peak_dtype, a.peak_size)
        self.peaks = self.measure_peaks()
        counts = bc.param_counts(self.main_model.config)
        print(
            f"machine: {json.dumps(self.info)}\nmodel: {a.preset} {self.main_model.config}\n"
            f"params: {json.dumps(counts)}\npeak for MFU: {self.peak / 1e12:.3f} TFLOP/s "
            f"({'given' if a.peak_tflops else f'measured {a.peak_dtype} {a.peak_size}^3 jnp.dot'})\n"
            "measured matmul peaks (TFLOP/s, each row's 'of peak' uses its framework and dtype): "
            + ", ".join(f"{fw} {dt} {v / 1e12:.3f}" for (fw, dt), v in self.peaks.items())
        )
        host = bc.layout_batch(self.pairs(seed=0), "padded", max_length=a.length)
        self.host = host
        groups = a.groups.split(",")
        if "main" in groups:
            self.group_main(host, dtype, compute)
            if a.variants:
                self.group_variants(host)
        if "shared" in groups:
            self.group_shared()
        if "packing" in groups:
            self.group_packing()
        if "chunked" in groups:
            self.group_chunked()
        if "remat" in groups:
            self.group_remat(host, dtype, compute)
        if "bf16" in groups:
            self.group_bf16(host)
        print(
            "\nJSON "
            + json.dumps(
                dict(machine=self.info, args=vars(a), peak_flops=self.peak, jax_devices=str(jax.devices())),
                default=str,
            )
        )

    def measure_peaks(self) -> dict[tuple[str, str], float]:
        """Each framework's own measured square-matmul FLOP/s in fp32 and bf16: the limit a step of
        that framework and compute dtype is measured against (``peak_fraction``)."""
        a = self.args
        peaks = {("jax", dt): bc.matmul_peak(dt, a.peak_size) for dt in ("float32", "bfloat16")}
        if not a.no_torch:
            for dt in ("float32", "bfloat16"):
                peaks[("torch", dt)] = bc.torch_matmul_peak(dt, a.peak_size, device=a.torch_device)
        return peaks

    def torch_source(self, model: Any) -> Any:
        if self.args.weights == "memory":
            return (model.config.to_hf(), bc.hf_state_dict(model, model.params))
        from alignjax.models import save_pretrained

        path = tempfile.mkdtemp(prefix="dpo_bench_")
        save_pretrained(model, model.params, path)
        return path

    def group_main(self, host: dict, dtype: str, compute: str | None) -> None:
        a, m = self.args, self.main_model
        runners, meta = {}, {}
        width = self.logit_width
        runners["alignjax"], meta["alignjax"] = self.jax_runner(
            m, host, "model", vocab_chunk=a.vocab_chunk, logit_width=width
        )
        if width is not None:
            runners["alignjax all positions"], meta["alignjax all positions"] = self.jax_runner(
                m, host, "model", vocab_chunk=a.vocab_chunk
            )
        if not a.no_cached_jax:
            runners["alignjax cached-ref"], meta["alignjax cached-ref"] = self.jax_runner(
                m, host, "batch", vocab_chunk=a.vocab_chunk, logit_width=width
            )
        try:
            if not a.no_torch:
                source = self.torch_source(m)
                amp = compute == "bfloat16"
                runners["pytorch"], meta["pytorch"] = self.torch_runner(source, host, "model", amp)
                if width is not None:
                    runners["pytorch logits_to_keep"], meta["pytorch logits_to_keep"] = self.torch_runner(
                        source, host, "model", amp, logits_to_keep=True
                    )
        except Exception as e:  # noqa: BLE001  (report alignjax's figures even when the baseline breaks)
            print(f"PyTorch baseline could not run: {type(e).__name__}: {e}", flush=True)
            a.no_torch = True
            runners.pop("pytorch", None)
            runners.pop("pytorch logits_to_keep", None)
        if not a.no_torch:
            if not a.no_cached_torch:
                cached = runners["alignjax cached-ref"].add_reference_cache(m.params, host)
                runners["pytorch cached-ref"], meta["pytorch cached-ref"] = self.torch_runner(
                    source, cached, "batch", amp
                )
            # Same weights, same batch: the first steps' losses (policy = reference: log 2) and
            # gradient norms must agree, or the timings compare different computations. The DPO
            # gradient is beta (1 - sigmoid(beta margin)) grad(margin) = beta (1 - e^-loss) grad(margin),
            # so dividing the norm by 1 - e^-loss compares grad(margin) even where bf16 rounding
            # leaves the first margin off 0 (docs/benchmarks.md: the GPU first-step numerics).
            jv, tv = meta["alignjax"]["first"], meta["pytorch"]["first"]
            print("first-step check (loss, grad_norm):", json.dumps(dict(alignjax=jv, pytorch=tv)))
            jn, tn = (v["grad_norm"] / -math.expm1(-v["loss"]) for v in (jv, tv))
            tol = 1e-4 if compute is None else 1e-2
            print(f"first-step grad_norm / (1 - e^-loss): {jn:.6g} vs {tn:.6g}")
            if abs(jn - tn) > tol * tn:
                print(f"WARNING: first-step gradients differ by more than {tol:g} (relative)")
        self.time_group("main", runners, meta, "pytorch" if not a.no_torch else "alignjax")
        # kept for the variants group and the GPU script's profile; the other runners are freed
        self.main_runner, self.main_meta = runners["alignjax"], meta["alignjax"]

    def group_variants(self, host: dict) -> None:
        """alignjax's step with other settings (``--variants``) against its default, after the main
        group has freed the PyTorch runners (on a GPU the two frameworks share the device memory)."""
        a = self.args
        if a.torch_device.startswith("cuda"):
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()
        runners, meta = {"alignjax": self.main_runner}, {"alignjax": self.main_meta}
        compute = self.main_model.config.dtype
        for variant in filter(None, a.variants.split(",")):
            name = f"alignjax {variant}"
            runners[name], meta[name] = self.jax_runner(
                self.main_model, host, "model", vocab_chunk=a.vocab_chunk, logit_width=self.logit_width,
                **variant_options(variant, compute),
            )
        firsts = {name: m["first"] for name, m in meta.items()}
        print("first-step values (loss, grad_norm):", json.dumps(firsts))
        self.time_group("variants", runners, meta, "alignjax")

    def group_shared(self) -> None:
        a = self.args
        ex = self.pairs(seed=1, prompt_length=a.shared_prompt)
        runners, meta = {}, {}
        for layout in ("padded", "shared_prompt"):
            host = bc.layout_batch(ex, layout, max_length=a.length)
            runners[layout], meta[layout] = self.jax_runner(self.main_model, host, "model")
        self.time_group("shared", runners, meta, "padded")

    def group_packing(self) -> None:
        a = self.args
        ex = self.pairs(seed=2, skew=True, num_pairs=a.pairs * a.skew_factor)
        runners, meta = {}, {}
        for layout in ("padded", "packed"):
            host = bc.layout_batch(ex, layout, max_length=a.length)
            runners[layout], meta[layout] = self.jax_runner(self.main_model, host, "model")
        self.time_group("packing", runners, meta, "padded")

    def group_chunked(self) -> None:
        a = self.args
        model = self.model("float32", None, vocab_size=a.big_vocab)
        ex = self.pairs(seed=3, num_pairs=a.chunk_pairs, vocab_size=a.big_vocab)
        host = bc.layout_batch(ex, "padded", max_length=a.length)
        runners, meta = {}, {}
        runners["dense logits"], meta["dense logits"] = self.jax_runner(model, host, "model")
        name = f"vocab_chunk={a.big_vocab_chunk}"
        runners[name], meta[name] = self.jax_runner(model, host, "model", vocab_chunk=a.big_vocab_chunk)
        out = self.time_group("chunked", runners, meta, "dense logits")
        temp = {r["variant"]: r["temp_gib"] for r in out["rows"]}
        print(f"temp memory dense / chunked: {temp['dense logits'] / temp[name]:.1f}x")

    def group_remat(self, host: dict, dtype: str, compute: str | None) -> None:
        runners, meta = {}, {}
        for policy in ("none", "full", "dots", "dots_no_batch"):
            model = (
                self.main_model
                if policy == self.main_model.config.remat
                else self.model(dtype, compute, remat=policy)
            )
            runners[policy], meta[policy] = self.jax_runner(model, host, "model")
        self.time_group("remat", runners, meta, "none")

    def group_bf16(self, host: dict) -> None:
        a = self.args
        runners, meta = {}, {}
        fp32 = self.model("float32", None)
        width = self.logit_width
        runners["alignjax fp32"], meta["alignjax fp32"] = self.jax_runner(
            fp32, host, "model", logit_width=width
        )
        runners["alignjax bf16"], meta["alignjax bf16"] = self.jax_runner(
            self.model("float32", "bfloat16"), host, "model", logit_width=width
        )
        if not a.no_torch:
            source = self.torch_source(fp32)
            runners["pytorch fp32"], meta["pytorch fp32"] = self.torch_runner(source, host, "model")
            runners["pytorch amp-bf16"], meta["pytorch amp-bf16"] = self.torch_runner(
                source, host, "model", True
            )
            if width is not None:
                name = "pytorch amp-bf16 logits_to_keep"
                runners[name], meta[name] = self.torch_runner(
                    source, host, "model", True, logits_to_keep=True
                )
        self.time_group("bf16", runners, meta, "alignjax fp32")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-7m")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--length", type=int, default=256, help="tokens per chosen/rejected sequence")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--vocab-chunk", type=int, default=None, help="main group: chunked log-probs")
    ap.add_argument(
        "--max-completion-length",
        type=int,
        default=-1,
        help="the data.max_completion_length of the run: alignjax's head runs at the counted tokens "
        "only, and TRL's use_logits_to_keep rows are added (-1 = the synthetic completions' length, "
        "0 = unset: the head at every position)",
    )
    ap.add_argument("--groups", default="main,shared,packing,chunked,remat,bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    ap.add_argument("--torch-device", default="cpu")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-cached-torch", action="store_true", help="main group: skip PyTorch cached-ref")
    ap.add_argument("--no-cached-jax", action="store_true", help="main group: skip alignjax cached-ref")
    ap.add_argument(
        "--variants",
        default="",
        help="alignjax's step with other settings, timed against its default after the main group, "
        "comma-separated: " + ", ".join(VARIANTS) + ", or "
        "xla:FLAG=VALUE[+FLAG=VALUE] (XLA compiler options added to the step's own)",
    )
    ap.add_argument("--overrides", default="", help='JSON ModelConfig fields, e.g. {"num_layers": 2}')
    ap.add_argument(
        "--weights",
        choices=("disk", "memory"),
        default="disk",
        help="torch weights via save_pretrained/from_pretrained (disk) or in memory",
    )
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--shared-prompt", type=int, default=192, help="prompt tokens in the shared group")
    ap.add_argument("--skew-factor", type=int, default=2, help="packing group: pairs x this")
    ap.add_argument("--big-vocab", type=int, default=128256)
    ap.add_argument("--big-vocab-chunk", type=int, default=8192)
    ap.add_argument("--chunk-pairs", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator; 0 = measure a matmul")
    ap.add_argument("--peak-dtype", default="float32")
    ap.add_argument("--peak-size", type=int, default=2048)
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop timing rounds after this (0 = none)")
    ap.add_argument(
        "--host-malloc",
        choices=("retain", "system"),
        default="retain",
        help="glibc's allocator for both frameworks: retained as alignjax.main runs (alignjax.host_memory), "
        "or as the system leaves it",
    )
    return ap


def main() -> None:
    args = parser().parse_args()
    # Before Bench(...) touches a device: the setting acts only on threads that have not allocated yet.
    retained = args.host_malloc == "retain" and host_memory.retain_freed_memory()
    bench = Bench(args)
    bench.info["host_malloc_retained"] = retained
    bench.run()


if __name__ == "__main__":
    main()
