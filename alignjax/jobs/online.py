"""The online jobs: GRPO / RLOO and PPO through the shared train loop, and online (iterative) DPO in
rounds (their objectives, steps and pairs: :mod:`alignjax.online`).

``grpo`` / ``rloo`` (``config.job``; ``experiments/grpo.py``, ``experiments/rloo.py``):
:func:`alignjax.train.loop.run_train` with :class:`alignjax.online.train.PolicyGradientObjective`.
Each step the data pipeline gives prompts (the prompt part of ``config.data.kind='sft'`` rows; their
completions are not used); the objective's ``prepare_batch`` samples ``config.online.num_generations``
completions of each from the current policy (:mod:`alignjax.online.rollout`, keys folded from the
seed, the step and the micro-batch, so a rerun samples the same), scores them
(:func:`alignjax.online.train.make_reward_source`) and the jitted step then takes
``config.online.num_iterations`` optimiser steps on that rollout batch (TRL's ``num_iterations``; the
first is on-policy, ratio 1), with the loss :func:`alignjax.losses.policy_gradient.grpo` (advantages
:func:`alignjax.losses.policy_gradient.group_advantages`, ``config.online.scale_rewards``) or ``rloo``
(KL-penalised rewards, leave-one-out advantages, ``config.online.normalize_advantages``).
Checkpoints, exact resume (data position, params and RNG restored; rollouts recomputed from them),
NaN handling and metrics are the loop's (metric names: :mod:`alignjax.online.train`).
With ``config.online.num_iterations = mu`` the learning-rate schedule advances mu updates per step.

``online_dpo`` (``experiments/online_dpo.py``; "Direct Language Model Alignment from Online AI
Feedback", Guo et al., arXiv:2402.04792; iterative DPO, Xu et al., arXiv:2312.16682): rounds of
sampling ``num_generations`` completions for ``prompts_per_round`` prompts from the current policy,
scoring them, building pairs (``pairs='best_worst'``: the best against the worst of each prompt;
``'all'``: every pair with a reward gap, its gap as the record's ``margin``), then ``run_train``
with any registered pairwise loss (``config.loss``) from the current params, the reference fixed
(the initial policy) or refreshed to the round's starting policy (``config.online.reference``);
``config.online.reward_augmented`` relabels each round's pairs by their rewards first
(:mod:`alignjax.online.relabel`, prompt prefix ``config.online.augment_prefix``).

``ppo`` (``experiments/ppo.py``): the policy and a value head in one state (:mod:`alignjax.online.ppo`),
rollouts as for GRPO, TRL 0.x's clipped policy and value losses.

Every job starts from ``config.model`` or, with ``config.online.sft_steps > 0``, from an SFT stage on
the task's SFT records in ``<workdir>/sft`` (``config.sft`` overrides), which is also the reference;
they report the held-out greedy accuracy under the task's verifier before and after.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from alignjax import sharding, storage
from alignjax.data.pipeline import resolve_tokenizer
from alignjax.eval.task_accuracy import completion_text
from alignjax.online import ppo, rollout
from alignjax.online import train as online
from alignjax.online.relabel import relabel
from alignjax.search.generate import Generator
from alignjax.search.iterate import round_batch_size
from alignjax.search.pairs import write_jsonl
from alignjax.train.loop import build_model, run_train
from alignjax.train.pipeline import stage_config

REFERENCES = ("fixed", "refresh")


def sft_stage(config: Any, workdir: str) -> tuple[Any, Any]:
    """``(model, params)`` to start from: the SFT stage's (``config.online.sft_steps > 0``; in
    ``config.online.sft_dir``, "" = ``<workdir>/sft``, so that several runs can start from one
    finished SFT) or ``config.model``'s (a preset initialised with ``config.seed``)."""

    if int(config.online.sft_steps) > 0:
        c = stage_config(config, "sft")
        with c.unlocked():
            c.train.num_steps = int(config.online.sft_steps)
        out = run_train(c, config.online.get("sft_dir") or os.path.join(workdir, "sft"))
        return out.model, out.params

    mesh, rules = sharding.make_mesh(dict(config.mesh)), sharding.rules_from_config(config.rules or None)
    vocab = resolve_tokenizer(config.data.tokenizer).vocab_size
    model, params = build_model(config.model, mesh, rules, vocab)
    if params is None:  # a preset: initialised as the loop would (config.seed)
        init = jax.jit(model.init, out_shardings=model.shardings(mesh, rules))
        params = init(jax.random.PRNGKey(config.seed))
    return model, params


def _write_json(path: str, obj: Any) -> None:
    if jax.process_index() == 0:
        storage.write_json(path, obj)


def run_policy_gradient(config: Any, workdir: str) -> dict[str, Any]:
    """The ``grpo`` / ``rloo`` job (see the module docstring); returns the loop's summary plus the
    held-out accuracy before (``task_accuracy/initial``) and after (``task_accuracy/final``)."""

    online.make_spec(config, int(config.data.batch_size), "none")  # config errors before any compute
    os.makedirs(workdir, exist_ok=True)
    tokenizer = resolve_tokenizer(config.data.tokenizer)
    model, params = sft_stage(config, workdir)
    generator = Generator(model, pad_id=int(tokenizer.pad_id or 0), min_batch_bucket=8)
    source = online.make_reward_source(config, model, params, tokenizer)
    initial_path = os.path.join(workdir, "initial_eval.json")
    if os.path.exists(initial_path):
        initial = storage.read_json(initial_path)["accuracy"]
    else:
        initial = online.greedy_accuracy(config, model, params, tokenizer, generator)
        _write_json(initial_path, {"accuracy": initial})
    objective = online.PolicyGradientObjective(config, tokenizer, source, generator)
    result = run_train(config, workdir, init_params=params, model=model, objective=objective)
    if result.stopped:
        return result.summary
    final = online.greedy_accuracy(config, model, result.params, tokenizer, generator)
    summary = {**result.summary, "task_accuracy/initial": initial, "task_accuracy/final": final}
    _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def run_online_dpo(config: Any, workdir: str) -> dict[str, Any]:
    """The ``online_dpo`` job (see the module docstring). Resumable: a round's ``pairs.jsonl`` and
    ``rollout.json`` are written once and reused, and its ``run_train`` resumes from (or, finished,
    restores) its own checkpoints in ``round_k/train``."""

    o = config.online
    if o.reference not in REFERENCES:
        raise ValueError(f"config.online.reference={o.reference!r}; choose one of {list(REFERENCES)}")
    if o.pairs not in online.PAIRINGS:
        raise ValueError(f"config.online.pairs={o.pairs!r}; choose one of {list(online.PAIRINGS)}")
    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    tokenizer = resolve_tokenizer(config.data.tokenizer)
    model, init_params = sft_stage(config, workdir)
    generator = Generator(model, pad_id=int(tokenizer.pad_id or 0), min_batch_bucket=8)
    source = online.make_reward_source(config, model, init_params, tokenizer)
    sampling = online.sampling_config(config, tokenizer.eos_id)
    params = init_params
    rounds: list[dict[str, Any]] = []
    initial = online.greedy_accuracy(config, model, params, tokenizer, generator)
    for k in range(int(o.rounds)):
        rdir = os.path.join(workdir, f"round_{k}")
        os.makedirs(rdir, exist_ok=True)
        pairs_path = os.path.join(rdir, "pairs.jsonl")
        stats_path = os.path.join(rdir, "rollout.json")
        ref = init_params if o.reference == "fixed" else params
        if not (os.path.exists(pairs_path) and os.path.exists(stats_path)):
            prompts = online.round_prompts(config, k)
            key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), k)
            ids = [list(tokenizer.encode(p)) for p in prompts]
            ro = rollout.sample(generator, params, ids, key, sampling)
            r = online.score(source, tokenizer, ro, config)
            texts = [completion_text(tokenizer, c) for c in ro.completions()]
            records = online.build_pairs(
                [p for p in prompts for _ in range(ro.num_generations)],
                texts,
                r,
                ro.num_generations,
                o.pairs,
                scores=bool(o.reward_augmented),
            )
            if o.reward_augmented:
                records = relabel(records, prefix=o.augment_prefix)
            if jax.process_index() == 0:
                write_jsonl(records, pairs_path)
            stats = {
                "reward": float(np.nanmean(r)),
                "reward_std": float(np.nanstd(r, ddof=1)),
                "completions/mean_length": float(ro.lengths.mean()),
                "num_pairs": len(records),
            }
            _write_json(stats_path, stats)
        stats = storage.read_json(stats_path)
        c = stage_config(config, "dpo")
        batch = round_batch_size(int(config.data.batch_size), stats["num_pairs"], jax.device_count())
        if batch > 0:
            with c.unlocked():
                c.data.kind, c.data.source, c.data.eval_source = "pairwise", pairs_path, ""
                c.data.batch_size = batch
                c.reference.kind = "frozen"
            out = run_train(c, os.path.join(rdir, "train"), init_params=params, ref_params=ref, model=model)
            params = out.params
        acc = online.greedy_accuracy(config, model, params, tokenizer, generator)
        info = {"round": k, **stats, "trained": batch > 0, "task_accuracy": acc}
        _write_json(os.path.join(rdir, "done.json"), info)
        rounds.append(info)
    summary = {
        "task_accuracy/initial": initial,
        "task_accuracy/final": rounds[-1]["task_accuracy"] if rounds else initial,
        "task_accuracy/rounds": [r["task_accuracy"] for r in rounds],
        "reward/rounds": [r["reward"] for r in rounds],
        "num_pairs/rounds": [r["num_pairs"] for r in rounds],
        "wall_s": time.time() - t0,
    }
    _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def run_ppo(config: Any, workdir: str) -> dict[str, Any]:
    """The ``ppo`` job: the SFT stage or ``config.model``, a value head added (seed + 2), PPO
    (:mod:`alignjax.online.ppo`) through ``run_train``; the summary adds the held-out greedy accuracy
    before and after."""

    ppo.make_spec(config, int(config.data.batch_size), "model")
    os.makedirs(workdir, exist_ok=True)
    tokenizer = resolve_tokenizer(config.data.tokenizer)
    decoder, params = sft_stage(config, workdir)
    model = ppo.PolicyValueModel(decoder)
    init_head = jax.jit(model.init_head, out_shardings=model.shardings()["head"])
    head = init_head(jax.random.PRNGKey(config.seed + 2))
    generator = Generator(decoder, pad_id=int(tokenizer.pad_id or 0), min_batch_bucket=8)
    source = online.make_reward_source(config, decoder, params, tokenizer)
    initial = online.greedy_accuracy(config, decoder, params, tokenizer, generator)
    objective = ppo.PPOObjective(config, tokenizer, source, generator)
    result = run_train(
        config, workdir, init_params={"decoder": params, "head": head}, model=model, objective=objective
    )
    if result.stopped:
        return result.summary
    final = online.greedy_accuracy(config, decoder, result.params["decoder"], tokenizer, generator)
    summary = {**result.summary, "task_accuracy/initial": initial, "task_accuracy/final": final}
    _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def run(config: Any, workdir: str) -> dict[str, Any]:
    """The online job ``config.job`` names (``grpo``, ``rloo``, ``online_dpo``, ``ppo``); returns its
    summary (also in summary.json)."""
    jobs = {
        "grpo": run_policy_gradient,
        "rloo": run_policy_gradient,
        "online_dpo": run_online_dpo,
        "ppo": run_ppo,
    }
    if config.job not in jobs:
        raise ValueError(f"config.job={config.job!r}: the online jobs are {sorted(jobs)}")
    return jobs[config.job](config, workdir)
