"""MCTS search throughput: tree nodes expanded/s and generated tokens/s (tiny preset, multi-step arithmetic).

    .venv/bin/python bench/search_throughput.py [--prompts 8 --iterations 4 --children 3 --depth 3]

The first search compiles (its time is reported separately); the second, identical one (same seed, so the
same shapes and buckets), repeated, gives the steady-state median. Runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from alignjax.data import synthetic as syn
from alignjax.models import PRESETS, Model
from alignjax.search import Generator, MCTSConfig, Policy, SearchConfig, extract_pairs, search_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--step-tokens", type=int, default=12)
    args = ap.parse_args()

    tok = syn.multistep_tokenizer()
    model = Model(PRESETS["tiny"].replace(vocab_size=tok.vocab_size))
    params = model.init(jax.random.PRNGKey(0))
    policy = Policy(model, params, tok, syn.multistep_verify, lambda s: syn.final_answer(s) is not None,
                    generator=Generator(model, pad_id=tok.pad_id, min_prompt_bucket=32, min_batch_bucket=8))
    prompts = [syn.multistep_prompt(*p) for p in syn.multistep_problems(args.prompts, seed=1)]
    cfg = SearchConfig(MCTSConfig(num_iterations=args.iterations, num_children=args.children,
                                  max_depth=args.depth), max_step_tokens=args.step_tokens)

    t0 = time.perf_counter()
    search_policy(policy, prompts, cfg)
    first = time.perf_counter() - t0
    traces = policy.generator.num_traces
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        trees, stats, counters = search_policy(policy, prompts, cfg)
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]  # median
    assert policy.generator.num_traces == traces, "the timed run recompiled"
    result = {
        "backend": jax.default_backend(), "preset": "tiny", "task": "multistep arithmetic",
        "trees": len(prompts), "iterations": args.iterations, "children": args.children,
        "max_depth": args.depth, "max_step_tokens": args.step_tokens, "repeats": args.repeats,
        "seconds_first_run_incl_compile": round(first, 2), "seconds_median": round(dt, 3),
        "batched_steps": stats.steps, "nodes_expanded": stats.expanded_nodes,
        "nodes_created": stats.new_children,
        "generated_tokens": counters["generated_tokens"], "self_evaluations": counters["evaluated"],
        "nodes_expanded_per_s": round(stats.expanded_nodes / dt, 1),
        "nodes_created_per_s": round(stats.new_children / dt, 1),
        "generated_tokens_per_s": round(counters["generated_tokens"] / dt, 1),
        "pairs": len(extract_pairs(trees)), "compiled_programs": traces,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
