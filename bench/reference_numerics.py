"""Is the reference equal to the policy in the DPO step at step 1? First-step values per compile setting.

With policy = reference, DPO's first loss is log 2 and the rewards are 0 exactly when the two forwards
round alike; in bf16 they do not if XLA compiles them into different kernels (fusions, gemm
epilogues, Triton vs cuBLAS). For each setting -- the step's own, ``excess-precision`` (XLA's
default rounding), or ``logprobs.STRICT_ROUNDING`` plus the XLA options named -- this compiles
``bench.common.JaxDPO`` (the train step as ``run_train`` builds it) on a llama3-1b-wide model with
``--layers`` layers, runs one step and prints the loss and ``rewards/chosen`` / ``rewards/rejected``
(beta x (policy - reference) log-prob sums). No timing.

    python3 bench/reference_numerics.py                        # GPU machine, about 1-2 minutes
    .venv/bin/python bench/reference_numerics.py --smoke       # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402

from alignjax.models import PRESETS, Model  # noqa: E402
from bench import common as bc  # noqa: E402
from bench.dpo_step import VARIANTS, variant_options  # noqa: E402

SETTINGS = (
    "default",
    "excess-precision",
    "xla_gpu_enable_triton_gemm=false",
    "xla_gpu_enable_triton_gemm=false+xla_gpu_enable_cublaslt=false",
    "xla_gpu_enable_triton_gemm=false+xla_gpu_autotune_level=0",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--smoke", action="store_true", help="a tiny model and batch (CPU)")
    args = ap.parse_args()
    overrides = dict(num_layers=args.layers)
    if args.smoke:
        overrides.update(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)
        overrides.update(vocab_size=512)
        args.length = 64
    config = PRESETS["llama3-1b"].replace(param_dtype="float32", dtype="bfloat16", **overrides)
    model = Model(config)
    model.params = model.init(jax.random.PRNGKey(0))
    pairs = bc.synthetic_pairs(
        1,
        prompt_length=args.length // 2,
        completion_length=args.length // 2,
        vocab_size=config.vocab_size,
        max_length=args.length,
    )
    host = bc.layout_batch(pairs, "padded", max_length=args.length)
    print(f"{jax.devices()[0].device_kind}: llama3-1b width, {args.layers} layers, 1 pair x {args.length}")
    for setting in args.settings.split(","):
        if setting == "default":
            options = {}
        else:
            name = setting if setting in VARIANTS else f"xla:{setting}"
            options = variant_options(name, model.config.dtype)
        runner = bc.JaxDPO(model, model.params, host, **options)
        runner.step()
        v = runner.values()
        row = {k: v[k] for k in ("loss", "rewards/chosen", "rewards/rejected")}
        row["loss_minus_log2"] = v["loss"] - math.log(2.0)
        print(f"{setting}: " + json.dumps(row), flush=True)
        del runner


if __name__ == "__main__":
    main()
