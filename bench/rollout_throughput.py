"""Rollout throughput: alignjax's KV-cache sampler (``alignjax.online.rollout``) against
``transformers``' ``generate`` on the same weights, in one process.

Both sides start from one random init (alignjax's, exported with ``alignjax.models.save_pretrained`` and
loaded by ``transformers.LlamaForCausalLM.from_pretrained``), sample ``--num-generations`` completions of
each of ``--prompts`` random prompts of ``--prompt-length`` tokens at temperature 1, exactly
``--new-tokens`` tokens each (no stop token, so both generate the same number of tokens), and are timed
after a warm-up call, interleaved round-robin over ``--rounds`` (machine-load drift hits both alike).
Reported: generated tokens per second (median over rounds) and the ratio to ``transformers``.

    .venv/bin/python bench/rollout_throughput.py                                   # bench-7m, 8 x 4 x 64
    .venv/bin/python bench/rollout_throughput.py --preset=tiny --prompts=2 --num-generations=2 \\
        --new-tokens=8 --rounds=1                                                  # smoke (the test)

PyTorch gets ``torch.set_num_threads(--threads)`` (default: all cores); XLA:CPU uses all cores.
Figures are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import host  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench-7m")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args(argv)
    host.print_header()

    import jax
    import numpy as np
    import torch
    import transformers

    from alignjax.models import from_pretrained, save_pretrained
    from alignjax.online import rollout
    from alignjax.search.generate import Generator

    torch.set_num_threads(a.threads)
    model = from_pretrained(a.preset)
    path = tempfile.mkdtemp(prefix="rollout_bench_")
    save_pretrained(model, model.params, path)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    prompts = rng.integers(3, V, (a.prompts, a.prompt_length)).tolist()
    G, M = a.num_generations, a.new_tokens
    cfg = rollout.SamplingConfig(num_generations=G, max_new_tokens=M)
    gen = Generator(model)
    key = jax.random.PRNGKey(0)
    ids = torch.tensor(prompts)

    def run_jax() -> int:
        ro = rollout.sample(gen, model.params, prompts, key, cfg)
        return int(ro.lengths.sum())

    def run_hf() -> int:
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=M, min_new_tokens=M, num_return_sequences=G,
                              pad_token_id=0)
        return int((out.shape[1] - ids.shape[1]) * out.shape[0])

    runs = {"transformers generate": run_hf, "alignjax rollout (KV-cache Generator)": run_jax}
    for fn in runs.values():  # warm-up: compiles the sampler
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, int] = {}
    for _ in range(a.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
    c = model.config
    print(f"model: {a.preset} ({c.num_layers} layers, width {c.hidden_size}, vocab {V}); "
          f"{a.prompts} prompts x {G} samples x {M} new tokens, prompt {a.prompt_length} tokens; "
          f"jax devices: {jax.device_count()}, torch threads: {a.threads}")
    print("| sampler | tokens | median s | tokens/s | vs transformers |")
    print("|---|---|---|---|---|")
    base = tokens["transformers generate"] / statistics.median(times["transformers generate"])
    for name in runs:
        s = statistics.median(times[name])
        rate = tokens[name] / s
        print(f"| {name} | {tokens[name]} | {s:.3f} | {rate:.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
