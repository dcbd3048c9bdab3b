"""Peak memory and time of the log-prob computation, chunked vs unchunked, at a 128k vocabulary.

Measures forward + backward (gradient w.r.t. the hidden states; ``--wrt=both`` adds the unembedding) of
``sum(next_token_logps(hidden @ W, ids))`` three ways: the dense path (``[B, T, V]`` fp32 logits)
and ``alignjax.logprobs.chunked_next_token_logps`` with vocabulary chunks (and optionally sequence
chunks). Peak memory is XLA's compiled memory analysis of the jitted function (temporary buffers
plus outputs; the arguments, identical for all variants, are reported separately), so it is exact
and does not depend on the allocator. All variants must give the same log-probs and gradients.

    .venv/bin/python bench/logprobs_memory.py                 # B=1, T=1024, D=256, V=128256
    .venv/bin/python bench/logprobs_memory.py --wrt=both          # also d/d unembedding
    .venv/bin/python bench/logprobs_memory.py --length=512 --repeats=1

Runs in about a minute on a 2-core CPU. Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from alignjax import logprobs as lp

MiB = 2**20


def build(variant: dict, ids: jax.Array, wrt: str):
    vocab_chunk, seq_chunk = variant.get("vocab_chunk"), variant.get("seq_chunk")

    def loss(hidden, unembedding):
        if vocab_chunk is None and seq_chunk is None:
            logits = jnp.einsum("btd,dv->btv", hidden, unembedding, preferred_element_type=jnp.float32)
            logps = lp.next_token_logps(logits, ids)
        else:
            logps = lp.chunked_next_token_logps(
                hidden, unembedding, ids, vocab_chunk=vocab_chunk, seq_chunk=seq_chunk
            )
        return jnp.sum(logps), logps

    def fn(hidden, unembedding):
        argnums = (0, 1) if wrt == "both" else (0,)
        (_, logps), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(hidden, unembedding)
        return logps, grads

    return fn


def measure(name: str, fn, args, repeats: int) -> tuple[dict, tuple]:
    compiled = jax.jit(fn).lower(*args).compile()
    stats = compiled.memory_analysis()
    out = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    row = dict(
        variant=name,
        temp_mib=stats.temp_size_in_bytes / MiB,
        output_mib=stats.output_size_in_bytes / MiB,
        argument_mib=stats.argument_size_in_bytes / MiB,
        peak_mib=(stats.temp_size_in_bytes + stats.output_size_in_bytes) / MiB,
        time_s=float(np.median(times)),
    )
    return row, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256, help="Llama-3 vocabulary size by default")
    parser.add_argument("--vocab-chunk", type=int, default=8192)
    parser.add_argument("--seq-chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--wrt", choices=("hidden", "both"), default="hidden",
        help="differentiate w.r.t. the hidden states only, or also the unembedding ([D, V] gradient output)",
    )
    parser.add_argument("--min-ratio", type=float, default=4.0, help="fail unless dense/chunked peak >= this")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(args.batch, args.length, args.dim)), jnp.float32)
    unembedding = jnp.asarray(rng.normal(size=(args.dim, args.vocab)) / np.sqrt(args.dim), jnp.float32)
    ids = jnp.asarray(rng.integers(0, args.vocab, size=(args.batch, args.length)), jnp.int32)

    variants = {
        "dense (fp32 [B,T,V] logits)": {},
        f"chunked vocab_chunk={args.vocab_chunk}": {"vocab_chunk": args.vocab_chunk},
        f"chunked vocab_chunk={args.vocab_chunk}, seq_chunk={args.seq_chunk}": {
            "vocab_chunk": args.vocab_chunk,
            "seq_chunk": args.seq_chunk,
        },
    }
    rows, outputs = [], []
    for name, variant in variants.items():
        row, out = measure(name, build(variant, ids, args.wrt), (hidden, unembedding), args.repeats)
        rows.append(row)
        outputs.append(jax.device_get(out))

    # Same result: log-probs and both gradients.
    ref_logps, ref_grads = outputs[0]
    for row, (logps, grads) in zip(rows[1:], outputs[1:]):
        np.testing.assert_allclose(logps, ref_logps, atol=1e-4, err_msg=row["variant"])
        for got, want in zip(grads, ref_grads):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=row["variant"])

    dense_peak = rows[0]["peak_mib"]
    shape = f"B={args.batch} T={args.length} D={args.dim} V={args.vocab}"
    machine = f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    print(f"log-prob forward+backward (grad w.r.t. {args.wrt}), {shape}, jax {jax.__version__}, "
          f"{jax.devices()[0].platform}, {machine}")
    print(f"{'variant':<48} {'peak MiB':>9} {'temp':>9} {'out':>8} {'args':>8} {'time s':>8} {'ratio':>6}")
    for row in rows:
        row["ratio"] = dense_peak / row["peak_mib"]
        print(f"{row['variant']:<48} {row['peak_mib']:9.1f} {row['temp_mib']:9.1f} {row['output_mib']:8.1f} "
              f"{row['argument_mib']:8.1f} {row['time_s']:8.3f} {row['ratio']:6.1f}")
    print("same log-probs and gradients: yes (atol 1e-4)")
    print("JSON " + json.dumps(dict(shape=shape, wrt=args.wrt, rows=rows)))
    worst = min(row["ratio"] for row in rows[1:])
    if worst < args.min_ratio:
        raise SystemExit(
            f"chunked peak memory only {worst:.2f}x lower than dense (need >= {args.min_ratio}x)"
        )


if __name__ == "__main__":
    main()
