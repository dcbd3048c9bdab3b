"""Peak memory and step time of a DPO step: full fine-tuning vs LoRA vs QLoRA (int8, nf4).

Each variant is the train loop's own step (``alignjax.train.step.make_train_step``, AdamW as
``config.optim``, the DPO sigmoid loss) and its state: full fine-tuning holds the policy, a frozen
reference (stored in the compute dtype, as the loop stores it) and two Adam moments; LoRA holds the
base, the adapters and the adapters' moments, its reference being the base with the adapters off
(no copy); QLoRA the same with the base kernels quantized. Peak memory is XLA's compiled memory
analysis of the jitted step (arguments + temporaries; the outputs alias the donated state), exact
and independent of the allocator, so it is taken from an abstract state (no arrays) and works for
shapes the machine could never run: ``--memory-preset`` (default ``llama3-8b``). Step time is
measured by running ``--steps`` steps of ``--preset`` (default ``bench-7m``) after a warm-up; each
variant's figure is a ratio to full fine-tuning's, measured in the same process.

    .venv/bin/python bench/lora_memory.py          # memory of llama3-8b, times of bench-7m (~15 min)
    .venv/bin/python bench/lora_memory.py --preset=tiny --memory-preset=tiny --pairs=2 --length=16 \
        --steps=1 --variants=full,nf4

Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from alignjax import logprobs, sharding  # noqa: E402
from alignjax.models import PRESETS, Model, lora  # noqa: E402
from alignjax.models.config import LoraConfig  # noqa: E402
from alignjax.train import reference as reflib  # noqa: E402
from alignjax.train import step as steplib  # noqa: E402
from alignjax.train.optim import make_optimizer  # noqa: E402
from bench.host import print_header  # noqa: E402

MiB = 2**20


VARIANTS = ("full", "lora", "int8", "nf4")


def variants(rank: int, names: tuple[str, ...] = VARIANTS) -> dict[str, LoraConfig | None]:
    """The measured variants (``--variants``); full fine-tuning, the baseline, always first."""
    out = {
        "full": ("full fine-tuning", None),
        "lora": (f"LoRA r={rank}", LoraConfig(rank=rank, alpha=2.0 * rank)),
        "int8": (f"QLoRA int8 r={rank}", LoraConfig(rank=rank, alpha=2.0 * rank, quantize="int8")),
        "nf4": (f"QLoRA nf4 r={rank}", LoraConfig(rank=rank, alpha=2.0 * rank, quantize="nf4")),
    }
    unknown = set(names) - set(out)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    return dict(out[n] for n in ("full", *(n for n in VARIANTS if n in names and n != "full")))


def _config(steps: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            loss=dict(name="sigmoid", nll_weight=0.0, beta=0.1),
            data=dict(kind="pairwise"),
            train=dict(nan_at_step=-1),
            optim=dict(
                name="adamw", learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                grad_clip_norm=1.0, schedule="constant", warmup_steps=0, end_learning_rate_factor=0.0,
            ),
        )
    )  # fmt: skip


def _batch(pairs: int, length: int, vocab: int, abstract: bool) -> dict:
    """A padded pair batch ``[1, 2B, T]`` (one micro-batch): chosen rows then rejected rows."""
    rows = 2 * pairs
    shapes = {
        k: (1, rows, length) for k in ("input_ids", "positions", "segment_ids", "loss_mask", "example_ids")
    }
    if abstract:
        return {
            k: jax.ShapeDtypeStruct(s, jnp.float32 if k == "loss_mask" else jnp.int32)
            for k, s in shapes.items()
        }
    rng = np.random.default_rng(0)
    half = length // 2
    return {
        "input_ids": jnp.asarray(rng.integers(0, vocab, shapes["input_ids"]), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), shapes["positions"]),
        "segment_ids": jnp.ones(shapes["segment_ids"], jnp.int32),
        "loss_mask": jnp.asarray(
            np.broadcast_to(np.arange(length) >= half, shapes["loss_mask"]), jnp.float32
        ),
        "example_ids": jnp.broadcast_to(
            jnp.arange(rows, dtype=jnp.int32)[None, :, None], shapes["example_ids"]
        ),
    }


def build(preset: str, lora_config: LoraConfig | None, args: argparse.Namespace, mesh):
    """``(model, jitted step, init(rng) -> state)`` as the train loop builds them."""
    cfg = PRESETS[preset].replace(
        param_dtype=args.param_dtype, dtype=args.compute_dtype, remat=args.remat, lora=lora_config
    )
    model = Model(cfg, mesh=mesh)
    config = _config(args.steps)
    spec = steplib.make_step_spec(config, args.pairs, "model")
    tx, schedule = make_optimizer(config.optim, 100)
    keep_ref = reflib.keeps_copy("frozen", model)

    def init(rng):
        params = model.init(rng)
        state = {
            "params": params,
            "opt_state": tx.init(lora.trainable_part(params)),
            "step": jnp.zeros((), jnp.int32),
            "rng": rng,
        }
        if keep_ref:
            state["ref_params"] = reflib.stored_reference(params, cfg.dtype)
        return state

    step = jax.jit(
        steplib.make_train_step(model, spec, tx, schedule),
        donate_argnums=(0,),
        compiler_options=logprobs.strict_rounding(cfg.dtype),
    )
    return model, step, init


def measure(preset: str, memory_preset: str, lora_config, args, mesh) -> dict:
    """Compiled memory of ``memory_preset``'s step and the measured step time of ``preset``'s (one
    compile when they are the same model)."""
    model, step, init = build(memory_preset, lora_config, args, mesh)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    compiled = step.lower(abstract, _batch(args.pairs, args.length, model.config.vocab_size, True)).compile()
    stats = compiled.memory_analysis()
    row = dict(
        state_mib=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)) / MiB,
        temp_mib=stats.temp_size_in_bytes / MiB,
        peak_mib=(stats.argument_size_in_bytes + stats.temp_size_in_bytes) / MiB,
        trainable=lora.count(lora.trainable_part(abstract["params"])),
        ref_copy="ref_params" in abstract,
    )
    if preset != memory_preset:
        model, step, init = build(preset, lora_config, args, mesh)
        compiled = step
    state = jax.jit(init)(jax.random.PRNGKey(0))
    batch = _batch(args.pairs, args.length, model.config.vocab_size, abstract=False)
    state, metrics = compiled(state, batch)  # warm-up (and the compile of a jitted step)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return dict(row, step_s=float(np.median(times)), loss=float(metrics["loss"]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="bench-7m", help="the model the step times are measured on")
    parser.add_argument(
        "--memory-preset", default="llama3-8b", help="the model of the compiled memory figures"
    )
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--compute-dtype", default="float32")
    parser.add_argument("--remat", default="full")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    args = parser.parse_args()
    print_header()
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    rows = []
    for name, lora_config in variants(args.rank, tuple(args.variants.split(","))).items():
        rows.append(dict(variant=name, **measure(args.preset, args.memory_preset, lora_config, args, mesh)))
    base = rows[0]
    print(
        f"\nDPO step, {args.pairs} pairs x {args.length} tokens, params {args.param_dtype}, compute "
        f"{args.compute_dtype}, remat {args.remat}; memory: {args.memory_preset} (compiled), "
        f"time: {args.preset}"
    )
    print(
        "| variant | trainable params | reference copy | state MiB | peak MiB | peak vs full | step s "
        "| step vs full |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['trainable'] / 1e6:.2f}M | {'yes' if r['ref_copy'] else 'no'} | "
            f"{r['state_mib']:.1f} | {r['peak_mib']:.1f} | {r['peak_mib'] / base['peak_mib']:.2f}x | "
            f"{r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f}x |"
        )
    print("JSON " + json.dumps(rows))


if __name__ == "__main__":
    main()
