"""The ``mcts_dpo`` job, the iterative MCTS-DPO loop: SFT, then rounds of search -> step-level pairs -> DPO ->
held-out eval (its pieces: :mod:`alignjax.search.iterate`).

"Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning" (Xie et al., arXiv:2405.00451).
``run(config, workdir)`` (``config.job = "mcts_dpo"``, see ``experiments/mcts_dpo.py``; its
summary, of :func:`mcts_dpo_rounds`, which also returns the trained params, model and generator):

1. **SFT** (``<sft_dir>``, default ``<workdir>/sft``): :func:`alignjax.train.loop.run_train` on the task's
   SFT records (the built-in multi-step arithmetic with a carry-dropping habit, or a GSM8K-style JSONL),
   or ``config.mcts_dpo.init`` = an HF directory / preset used as the SFT model as it is. The SFT params
   are the frozen reference of every round.
2. **Round k** (``<workdir>/round_k``) with the current policy:

   * ``method="mcts"``: :func:`alignjax.search.iterate.search_round` on ``prompts_per_round`` training prompts
     -> step-level pairs (``pairs.jsonl``: prompt = problem + shared steps, chosen/rejected = the highest-
     and lowest-Q child, ``chosen_visits``/``rejected_visits``) -> ``run_train`` with the ``mcts_dpo``
     loss (cDPO with ``eps = min(N_l / (max(1, N_w) + N_l), 0.5)``) and ``data.kind = "step"``;
   * ``method="instance"`` (the paper's instance-level baseline at the same sample budget): whole
     solutions are sampled per prompt until they have used as many generated tokens as the search spent on
     that prompt (``budget_from`` = an MCTS run's workdir, or ``budget_tokens`` per prompt), verified, and
     one correct vs one incorrect solution per prompt is a pair; ``run_train`` with ``instance_loss``
     (DPO, ``sigmoid``);

   then greedy decoding on the held-out prompts checked by the verifier (``eval.json``).

Resumable: a round whose ``done.json`` exists is skipped (its params are restored from the last checkpoint
of ``round_k/train``, without search or training); inside a round, ``pairs.jsonl`` is written atomically
and not regenerated, and ``run_train`` resumes from its own checkpoints in ``round_k/train``.
``<workdir>/summary.json`` holds the held-out accuracy of SFT and after every round, pairs and budgets.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax

from alignjax import sharding, storage
from alignjax.data.pipeline import resolve_tokenizer
from alignjax.data.synthetic import Task, reasoning_task
from alignjax.search.generate import Generator
from alignjax.search.iterate import (
    greedy_accuracy,
    instance_pairs,
    round_batch_size,
    round_prompts,
    search_config,
    search_round,
)
from alignjax.search.pairs import write_jsonl
from alignjax.search.run import Policy
from alignjax.train.checkpoint import fingerprint
from alignjax.train.loop import build_model, run_train
from alignjax.train.pipeline import stage_config

METHODS = ("mcts", "instance")


def _write_json(path: str, obj: Any) -> None:
    if jax.process_index() == 0:
        storage.write_json(path, obj)


def _write_records(records: Sequence[dict[str, Any]], path: str) -> None:
    if jax.process_index() == 0:
        write_jsonl(records, path)


@dataclasses.dataclass(frozen=True)
class MctsDpoResult:
    """What :func:`mcts_dpo_rounds` returns: ``summary`` (``summary.json``, what the ``mcts_dpo`` job
    prints), the final policy params, the SFT params (every round's reference), the model and the
    generator the rounds decoded with."""

    summary: dict[str, Any]
    params: Any
    sft_params: Any
    model: Any
    generator: Generator


def make_task(config: Any) -> Task:
    """The task ``config.data.source`` names, split and shaped by ``config.mcts_dpo``
    (:func:`alignjax.data.synthetic.reasoning_task`)."""
    m = config.mcts_dpo
    return reasoning_task(
        config.data.source,
        num_test=int(m.num_test),
        max_operand=int(m.max_operand),
        drop_rate=float(m.drop_rate),
        split_seed=int(m.split_seed),
        test_source=m.test_source,
    )


def run(config: Any, workdir: str) -> dict[str, Any]:
    """The ``mcts_dpo`` job: :func:`mcts_dpo_rounds`'s summary."""
    return mcts_dpo_rounds(config, workdir).summary


def mcts_dpo_rounds(config: Any, workdir: str) -> MctsDpoResult:
    """Runs (or resumes) the whole iterative loop in ``workdir``; writes ``summary.json``."""
    t0 = time.time()
    m = config.mcts_dpo
    if m.method not in METHODS:
        raise ValueError(f"config.mcts_dpo.method={m.method!r}; choose one of {list(METHODS)}")
    os.makedirs(workdir, exist_ok=True)

    task = make_task(config)
    tokenizer = resolve_tokenizer(config.data.tokenizer)

    # ---- SFT (or a given initial model): the policy's start and the frozen reference of every round
    sft_dir = m.sft_dir or os.path.join(workdir, "sft")
    t_sft = time.time()
    if m.init:
        init_cfg = stage_config(config, "sft")
        with init_cfg.unlocked():
            init_cfg.model.path = m.init

        mesh, rules = sharding.make_mesh(dict(config.mesh)), sharding.rules_from_config(config.rules or None)
        model, sft_params = build_model(init_cfg.model, mesh, rules, tokenizer.vocab_size)
        if sft_params is None:  # a preset: randomly initialised with config.seed
            init = jax.jit(model.init, out_shardings=model.shardings(mesh, rules))
            sft_params = init(jax.random.PRNGKey(config.seed))
    else:
        os.makedirs(sft_dir, exist_ok=True)
        sft_data = os.path.join(sft_dir, "sft_data.jsonl")
        if not os.path.exists(sft_data):
            _write_records(task.sft_records, sft_data)
        sft = run_train(stage_config(config, "sft", kind="sft", source=sft_data, eval_source=""), sft_dir)
        model, sft_params = sft.model, sft.params
    t_sft = time.time() - t_sft
    generator = Generator(model, pad_id=int(tokenizer.pad_id or 0), min_prompt_bucket=16, min_batch_bucket=8)

    def policy_for(params: Any) -> Policy:
        return Policy(
            model,
            params,
            tokenizer,
            task.verify,
            task.is_final_step,
            step_delimiter=m.step_delimiter,
            generator=generator,
        )

    test_prompts = task.test_prompts[: int(m.num_test)]
    sft_eval_path = os.path.join(sft_dir if not m.init else workdir, "eval.json")
    if os.path.exists(sft_eval_path):
        sft_eval = storage.read_json(sft_eval_path)
    else:
        sft_eval = greedy_accuracy(policy_for(sft_params), test_prompts, int(m.eval_max_new_tokens))
        _write_json(sft_eval_path, sft_eval)

    scfg = search_config(config)
    params = sft_params
    rounds: list[dict[str, Any]] = []
    for k in range(int(m.rounds)):
        rdir = os.path.join(workdir, f"round_{k}")
        os.makedirs(rdir, exist_ok=True)
        done_path = os.path.join(rdir, "done.json")
        if os.path.exists(done_path):
            info = storage.read_json(done_path)
            if info["trained"]:  # restore the round's final params (no search, no training step)
                params = _train_round(config, rdir, info["data_path"], model, params, sft_params)
            rounds.append(info)
            continue
        t_round = time.time()
        prompts = round_prompts(task, k, int(m.prompts_per_round), int(m.split_seed))
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), k)
        pairs_path = os.path.join(rdir, "pairs.jsonl")
        stats_path = os.path.join(rdir, "search.json")
        if not (os.path.exists(pairs_path) and os.path.exists(stats_path)):
            if m.method == "mcts":
                records, stats = search_round(policy_for(params), prompts, scfg, key)
            else:
                budgets = _instance_budgets(config, k, prompts)
                records, stats = instance_pairs(
                    policy_for(params),
                    prompts,
                    budgets,
                    key,
                    max_samples=int(m.max_samples),
                    max_new_tokens=int(m.eval_max_new_tokens),
                    temperature=float(config.search.temperature),
                    top_p=float(config.search.top_p),
                )
            _write_records(records, pairs_path)
            _write_json(stats_path, stats)
        stats = storage.read_json(stats_path)
        with open(pairs_path) as f:
            num_pairs = sum(1 for line in f if line.strip())
        t_search = time.time() - t_round
        trainable = round_batch_size(int(config.data.batch_size), num_pairs, jax.device_count()) > 0
        if trainable:
            params = _train_round(config, rdir, pairs_path, model, params, sft_params)
        ev = greedy_accuracy(policy_for(params), test_prompts, int(m.eval_max_new_tokens))
        info = {
            "round": k,
            "num_pairs": num_pairs,
            "trained": trainable,
            "data_path": pairs_path,
            "search": stats,
            "eval": ev,
            "fingerprint": fingerprint(params),
            "wall_s/search": t_search,
            "wall_s/round": time.time() - t_round,
        }
        _write_json(done_path, info)
        rounds.append(info)
        print(
            f"[{m.method}] round {k}: {num_pairs} pairs, held-out accuracy {ev['accuracy']:.3f} "
            f"({info['wall_s/round']:.0f} s)",
            flush=True,
        )

    summary = {
        "method": m.method,
        "task_accuracy/sft": sft_eval["accuracy"],
        "task_accuracy/final": rounds[-1]["eval"]["accuracy"] if rounds else sft_eval["accuracy"],
        "task_accuracy/rounds": [r["eval"]["accuracy"] for r in rounds],
        "num_pairs/rounds": [r["num_pairs"] for r in rounds],
        "generated_tokens/rounds": [r["search"]["generated_tokens"] for r in rounds],
        "num_test_prompts": len(test_prompts),
        "wall_s/sft": t_sft,
        "wall_s/total": time.time() - t0,
    }
    _write_json(os.path.join(workdir, "summary.json"), summary)
    return MctsDpoResult(summary, params, sft_params, model, generator)


def _instance_budgets(config: Any, k: int, prompts: Sequence[str]) -> list[int]:
    """Per-prompt token budgets: from the MCTS run in ``budget_from`` (same round) or ``budget_tokens``."""
    m = config.mcts_dpo
    if m.budget_from:
        path = os.path.join(m.budget_from, f"round_{k}", "search.json")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"config.mcts_dpo.budget_from={m.budget_from!r}: {path} is missing "
                "(run the MCTS method first, with the same prompts_per_round)"
            )
        per_prompt = storage.read_json(path)["tokens_per_prompt"]
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{path}: {len(per_prompt)} prompts searched, this round has {len(prompts)}")
        return [int(b) for b in per_prompt]
    if int(m.budget_tokens) <= 0:
        raise ValueError(
            "method='instance' needs config.mcts_dpo.budget_from (an MCTS workdir) or "
            "config.mcts_dpo.budget_tokens > 0 (generated tokens per prompt)"
        )
    return [int(m.budget_tokens)] * len(prompts)


def _train_round(config: Any, rdir: str, data_path: str, model: Any, params: Any, sft_params: Any) -> Any:
    """DPO on the round's pairs from ``params`` against the frozen SFT reference; returns the new params."""
    m = config.mcts_dpo
    kind, loss = ("step", m.step_loss) if m.method == "mcts" else ("pairwise", m.instance_loss)
    cfg = stage_config(config, "dpo", kind=kind, source=data_path, eval_source="")
    with open(data_path) as f:
        num_pairs = sum(1 for line in f if line.strip())
    with cfg.unlocked():
        cfg.data.batch_size = round_batch_size(int(cfg.data.batch_size), num_pairs, jax.device_count())
    with cfg.unlocked():
        cfg.loss.name = loss
        cfg.reference.kind = "frozen"
    out = run_train(cfg, os.path.join(rdir, "train"), init_params=params, ref_params=sft_params, model=model)
    return out.params
