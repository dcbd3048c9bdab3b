"""Iterative MCTS-DPO (arXiv:2405.00451) on the built-in multi-step arithmetic task, and its
instance-level DPO baseline at the same sample budget (see alignjax/jobs/mcts_dpo.py).

  python -m alignjax.main --config=experiments/mcts_dpo.py --workdir=workdirs/mcts_dpo
  python -m alignjax.main --config=experiments/mcts_dpo.py:method=instance,budget_from=workdirs/mcts_dpo \\
      --workdir=workdirs/instance --config.mcts_dpo.sft_dir=workdirs/mcts_dpo/sft
  python -m alignjax.main --config=experiments/mcts_dpo.py:runlocal --workdir=/tmp/mcts   # seconds
  python -m experiments.mcts_dpo --workdir=workdirs/mcts_repro --seeds=0,1,2 --jobs=3  # the reproduction

A GSM8K-style JSONL: ``--config.data.source=train.jsonl --config.mcts_dpo.test_source=test.jsonl
--config.data.tokenizer=<tokenizer dir> --config.model.path=<HF dir> --config.mcts_dpo.init=<HF dir>``.
Arguments: seed, method (mcts | instance), rounds, prompts, max_operand, drop_rate, sft_steps, dpo_steps,
iterations, children, beta, nll_weight, dpo_lr, budget_from, runlocal.
"""

from __future__ import annotations

from alignjax import configs


def get_config(arg: str | None = None):
    a = configs.parse_arg(
        arg,
        seed=0,
        method="mcts",
        rounds=3,
        prompts=128,
        max_operand=9,
        drop_rate=0.6,
        sft_steps=600,
        dpo_steps=20,
        iterations=4,
        children=3,
        beta=0.5,
        nll_weight=1.0,
        dpo_lr=1e-4,
        budget_from="",
        runlocal=False,
    )
    c = configs.base_config()
    c.job = "mcts_dpo"
    c.seed = a.seed
    c.model.path = "tiny"
    c.model.overrides = configs.quickstart_model(vocab_size=24)
    c.data.source = "synthetic:multistep"  # or a GSM8K-style JSONL path
    c.data.eval_source = ""
    c.data.tokenizer = "multistep"
    c.data.max_length = 32 if a.max_operand <= 9 else 48
    c.data.batch_size = 64
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    c.train.tensorboard = False
    c.train.progress = False
    c.train.plot = False

    c.mcts_dpo.method = a.method  # mcts | instance
    c.mcts_dpo.rounds = a.rounds
    c.mcts_dpo.prompts_per_round = a.prompts
    c.mcts_dpo.max_operand = a.max_operand
    c.mcts_dpo.drop_rate = a.drop_rate
    c.mcts_dpo.budget_from = a.budget_from
    c.search.num_iterations = a.iterations
    c.search.num_children = a.children

    c.sft.loss.update(name="sft", nll_weight=0.0)
    c.sft.reference.kind = "none"
    c.sft.optim.update(learning_rate=3e-3, warmup_steps=30, schedule="cosine")
    c.sft.train.num_steps = a.sft_steps

    c.dpo.loss.update(name="mcts_dpo", beta=a.beta, nll_weight=a.nll_weight)
    c.dpo.reference.kind = "frozen"
    c.dpo.optim.update(learning_rate=a.dpo_lr, warmup_steps=5, schedule="cosine")
    c.dpo.train.num_steps = a.dpo_steps
    if a.runlocal:
        c.sft.train.num_steps = 20
        c.dpo.train.num_steps = 4
        c.data.batch_size = 16
        c.mcts_dpo.rounds = 1
        c.mcts_dpo.prompts_per_round = 8
        c.mcts_dpo.num_test = 32
        c.search.num_iterations = 2
    return c


def reproduce(workdir: str, seeds: tuple[int, ...] = (0, 1, 2), arg: str = "") -> dict:
    """The MCTS-DPO reproduction: per seed, SFT -> MCTS step-level DPO rounds, and the instance-level DPO
    baseline from the same SFT at the MCTS run's per-prompt token budget; held-out greedy accuracy of
    SFT, instance-level DPO and MCTS-DPO per seed, with mean and standard deviation over seeds.
    Writes ``<workdir>/table.json`` and ``<workdir>/table.md``; finished runs are reused (resumable)."""
    import json
    import os
    import time

    import numpy as np

    from alignjax.jobs import mcts_dpo

    t0 = time.time()
    rows = []
    for seed in seeds:
        base = os.path.join(workdir, f"seed_{seed}")
        extra = f"seed={seed}" + (f",{arg}" if arg else "")
        out = {}
        for method in ("mcts", "instance"):
            budget = f",budget_from={os.path.join(base, 'mcts')}" if method == "instance" else ""
            c = get_config(f"{extra},method={method}{budget}")
            c.mcts_dpo.sft_dir = os.path.join(base, "sft")
            out[method] = mcts_dpo.run(c, os.path.join(base, method))
        rows.append(
            {
                "seed": seed,
                "sft": out["mcts"]["task_accuracy/sft"],
                "instance": out["instance"]["task_accuracy/final"],
                "mcts": out["mcts"]["task_accuracy/final"],
                "instance_rounds": out["instance"]["task_accuracy/rounds"],
                "mcts_rounds": out["mcts"]["task_accuracy/rounds"],
                "pairs/instance": out["instance"]["num_pairs/rounds"],
                "pairs/mcts": out["mcts"]["num_pairs/rounds"],
                "tokens/instance": out["instance"]["generated_tokens/rounds"],
                "tokens/mcts": out["mcts"]["generated_tokens/rounds"],
            }
        )
    stats = {
        k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows], ddof=1)))
        for k in ("sft", "instance", "mcts")
    }
    ordered = sum(r["sft"] < r["instance"] < r["mcts"] for r in rows)
    lines = [
        "| seed | SFT | instance-level DPO | MCTS step-level DPO | pairs inst/MCTS | tokens inst/MCTS |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['sft']:.3f} | {r['instance']:.3f} | {r['mcts']:.3f} | "
            f"{r['pairs/instance']} / {r['pairs/mcts']} | {r['tokens/instance']} / {r['tokens/mcts']} |"
        )
    lines.append(
        "| mean ± std | "
        + " | ".join(f"{stats[k][0]:.3f} ± {stats[k][1]:.3f}" for k in ("sft", "instance", "mcts"))
        + " | | |"
    )
    result = {"rows": rows, "mean_std": stats, "seeds_with_ordering": ordered, "wall_s": time.time() - t0}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"SFT < instance < MCTS on {ordered}/{len(rows)} seeds; {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=reproduce.__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arg", default="", help="get_config arguments, e.g. rounds=3,prompts=256")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run as this many parallel processes")
    flags = parser.parse_args()
    seeds = tuple(int(s) for s in flags.seeds.split(","))
    if flags.jobs > 1:  # one process per seed (resumable runs), then the table from the finished runs
        import subprocess
        import sys

        base = [
            sys.executable,
            "-m",
            "experiments.mcts_dpo",
            f"--workdir={flags.workdir}",
            f"--arg={flags.arg}",
        ]
        pending = list(seeds)
        while pending:
            batch, pending = pending[: flags.jobs], pending[flags.jobs :]
            procs = [subprocess.Popen([*base, f"--seeds={s}"]) for s in batch]
            if any(p.wait() for p in procs):
                raise SystemExit(f"a seed run failed (see the output above); rerun to resume {flags.workdir}")
    reproduce(flags.workdir, seeds, flags.arg)
