"""Reproduction: offline DPO vs online (iterative) DPO vs PPO vs GRPO from one SFT model, with the verifier
and with a learned reward model as the reward.

Claims ("Unpacking DPO and PPO: Disentangling Best Practices for Learning from Preference Feedback",
Ivison et al., arXiv:2406.09279): (1) PPO-style online learning against a reward model trained on the
preference data beats offline DPO on the same data; (2) a better reward model (higher accuracy on held-out
pairs) gives a better policy, though the downstream gains are much smaller than the reward-model gains.

Task: the built-in arithmetic task (:mod:`alignjax.data.synthetic`: 2-digit addition, units-first
answers, an SFT set whose carry problems drop the carry 80% of the time), the quickstart-sized decoder.
Per seed (model init, data order, sampling):

1. **SFT** once (``experiments/grpo.py``'s SFT stage, ``sft_steps`` steps) in ``seed<s>/sft``; every arm
   starts from it and uses it as its reference (``config.online.sft_dir``).
2. **Reward models**, one per ``rm_steps`` entry (``experiments/reward_model.py``'s ``bt`` job: the SFT
   model's decoder, as the paper and TRL initialise it, with a fresh value head) on the offline
   preference pairs ``synthetic:arithmetic_dpo:train``, the same pairs offline DPO trains on, trained for
   that many steps (the reward-model quality axis) and exported to ``seed<s>/rm_<steps>/hf``. Quality:
   the accuracy on 496 held-out pairs (``arithmetic_dpo:val``, the loop's ``eval/accuracy``), and the
   pairwise accuracy on the SFT policy's own samples (``num_generations`` samples of the held-out
   prompts; every pair of samples of one prompt that the verifier separates: the RM must score the
   correct one higher).
3. **Arms**, each ``updates`` optimiser steps (policy updates) from the SFT model:
   ``offline_dpo``: the online-DPO job's loss and optimiser (RPO: DPO at ``dpo_beta`` + the chosen
   answers' NLL, lr 4e-4) on the offline pairs, ``prompts_per_update`` pairs a step; ``online_dpo``
   (``experiments/online_dpo.py``): ``rounds`` rounds, each sampling ``num_generations`` completions of
   ``updates / rounds * prompts_per_update`` fresh prompts from the current policy, best-vs-worst pairs,
   ``updates / rounds`` steps of the same loss, reference fixed at the SFT model; ``grpo``
   (``experiments/grpo.py``): ``updates`` steps of ``prompts_per_update`` prompts x ``num_generations``
   samples, one optimiser step per rollout batch; ``ppo`` (``experiments/ppo.py``): the same rollout
   budget, ``ppo_iterations`` PPO epochs per rollout batch (1: one update per batch, as the others).
   The three online arms run with the verifier and with each reward model as the reward.

Matched: policy updates (``updates`` for every arm at ``ppo_iterations=1``) and prompts (each arm draws
``updates * prompts_per_update`` training prompts; offline DPO's are its pairs'); the online arms also
match their generated samples (``num_generations`` per prompt). Not matched: the pairs online DPO trains on
(only prompts whose samples differ in reward give a pair, so it loops over fewer pairs) and each method's
learning rate: the DPO arms keep the online-DPO experiment's (the quickstart's tuned RPO setting, 4e-4);
GRPO and PPO take ``grpo_learning_rate`` / ``ppo_learning_rate`` (their experiments' 1e-3 collapsed the
policy within a few steps at this size). Metric: greedy accuracy of the held-out test prompts (the
task's verifier), the same ``num_test`` prompts for every arm; the SFT row is every arm's starting point.
The training reward (the arm's own reward source on its samples) is reported as the mean over the first
and the last quarter of the run (``rounds`` parts: for online DPO, its first and last round).

    python -m alignjax.main --config=experiments/repro_online.py --workdir=workdirs/repro_online
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache as cc

from alignjax import recipes
from alignjax.configs import ConfigDict
from alignjax.data.pipeline import resolve_tokenizer
from alignjax.jobs import online as online_jobs
from alignjax.jobs import reward_model
from alignjax.models import save_pretrained
from alignjax.online import rewards as rewardlib
from alignjax.online import rollout
from alignjax.online import train as online
from alignjax.repro import common
from alignjax.search.generate import Generator
from alignjax.train.loop import run_train
from alignjax.train.pipeline import stage_config

ARMS = ("offline_dpo", "online_dpo", "grpo", "ppo")
REWARDS = ("verifier", "reward_model")  # reward_model: one cell per config.repro.rm_steps
PAIRS_TRAIN = "synthetic:arithmetic_dpo:train"
PAIRS_HELD_OUT = "synthetic:arithmetic_dpo:val"


def reward_model_names(p: ConfigDict) -> list[str]:
    """``reward_model_<steps>`` for each ``config.repro.rm_steps`` (also the reward column of its cells)."""
    return [f"reward_model_{int(steps)}" for steps in p.rm_steps]


def cells(p: ConfigDict) -> list[tuple[str, str]]:
    """The (arm, reward) cells: offline DPO has no reward source (it trains on the pairs' labels); the
    online arms one per reward source (the verifier, each reward model)."""
    out = []
    for arm in p.arms:
        if arm not in ARMS:
            raise ValueError(f"config.repro.arms: {arm!r} is not one of {list(ARMS)}")
        if arm == "offline_dpo":
            out.append((arm, "labels"))
            continue
        for reward in p.rewards:
            if reward not in REWARDS:
                raise ValueError(f"config.repro.rewards: {reward!r} is not one of {list(REWARDS)}")
            out += [(arm, r) for r in (reward_model_names(p) if reward == "reward_model" else [reward])]
    return out


def _quiet(c: Any) -> None:
    c.train.progress = c.train.plot = c.train.tensorboard = False
    c.train.async_checkpoints = False
    c.train.log_every = 1


def online_config(p: ConfigDict, arm: str, reward: str, seed: int, sft_dir: str, rm_dir: str = "") -> Any:
    """The arm's experiment config (``experiments/<arm>.py``, built by :mod:`alignjax.recipes`) at the
    matched budget, starting from the seed's SFT run in ``sft_dir``; a ``reward_model_*`` reward reads the
    exported model in ``rm_dir``."""
    U, B, G = int(p.updates), int(p.prompts_per_update), int(p.num_generations)
    shared = f"seed={seed},sft_steps={p.sft_steps},generations={G}"
    if arm == "online_dpo":
        R = int(p.rounds)
        if U % R:
            raise ValueError(f"config.repro.updates={U} is not a multiple of config.repro.rounds={R}")
        c = recipes.online_dpo(
            f"{shared},rounds={R},prompts={U // R * B},dpo_steps={U // R},beta={p.dpo_beta}"
        )
        c.data.batch_size = B
    elif arm == "grpo":
        c = recipes.grpo(f"{shared},steps={U},prompts={B},lr={p.grpo_learning_rate}")
    else:
        c = recipes.ppo(
            f"{shared},steps={U},prompts={B},iterations={p.ppo_iterations},lr={p.ppo_learning_rate}",
        )
    _quiet(c)
    c.train.checkpoint_every = max(U, 1)
    c.sft.data = dict(c.sft.data, batch_size=int(p.sft_batch_size))
    c.online.sft_dir = sft_dir
    c.online.num_test = int(p.num_test)
    if reward.startswith("reward_model"):
        c.online.reward, c.online.reward_path = "reward_model", rm_dir
    return c


def offline_dpo_config(p: ConfigDict, seed: int) -> Any:
    """The online-DPO job's preference stage (loss, optimiser) on the offline pairs, ``updates`` steps."""
    base = recipes.online_dpo(f"seed={seed},sft_steps={p.sft_steps},beta={p.dpo_beta}")
    c = stage_config(base, "dpo")
    _quiet(c)
    with c.unlocked():
        c.data.kind, c.data.source, c.data.eval_source = "pairwise", PAIRS_TRAIN, ""
        c.data.batch_size = int(p.prompts_per_update)
        c.reference.kind = "frozen"
        c.train.num_steps = c.train.checkpoint_every = int(p.updates)
    return c


def reward_model_config(p: ConfigDict, seed: int, steps: int, sft_hf: str, export_dir: str) -> Any:
    """experiments/reward_model.py's Bradley-Terry job (:func:`alignjax.recipes.reward_model`) on the
    offline pairs for ``steps`` steps, the decoder initialised from the SFT model (``sft_hf``, an HF
    directory; the value head fresh), held-out accuracy on ``arithmetic_dpo:val``."""
    c = recipes.reward_model("objective=bt")
    _quiet(c)
    c.seed = seed
    c.model.path = sft_hf
    c.data.source, c.data.eval_source = PAIRS_TRAIN, PAIRS_HELD_OUT
    c.data.max_length = 12
    c.data.batch_size = int(p.rm_batch_size)
    c.data.num_eval = c.data.eval_batch_size = int(p.rm_num_eval)
    c.train.num_steps = c.train.checkpoint_every = int(steps)
    c.optim.learning_rate = float(p.rm_learning_rate)
    c.reward.export_dir = export_dir
    return c


def on_policy_rm_accuracy(p: ConfigDict, base: Any, model: Any, params: Any, rm_dir: str) -> float:
    """Pairwise accuracy of the reward model on the SFT policy's samples of the held-out prompts: over
    every pair of one prompt's samples where the verifier accepts exactly one, the share where the RM
    scores the accepted one higher."""
    tok = resolve_tokenizer(base.data.tokenizer)
    gen = Generator(model, pad_id=int(tok.pad_id or 0), min_batch_bucket=8)
    prompts = online.held_out_prompts(base)
    ro = rollout.sample(
        gen,
        params,
        [list(tok.encode(p)) for p in prompts],
        jax.random.PRNGKey(int(base.seed) + 7),
        online.sampling_config(base, tok.eos_id),
    )
    correct = online.score(rewardlib.VerifierReward(rewardlib.builtin_verifier("arithmetic")), tok, ro, base)
    rm = online.score(rewardlib.RewardModelReward.from_dir(rm_dir), tok, ro, base)
    G = ro.num_generations
    right = total = 0
    for i in range(len(prompts)):
        v, s = correct[i * G : (i + 1) * G], rm[i * G : (i + 1) * G]
        good, bad = s[v == 1], s[v == 0]
        right += int((good[:, None] > bad[None, :]).sum())
        total += good.size * bad.size
    return right / total if total else float("nan")


def first_and_last_quarter(values: list[float], parts: int) -> tuple[float, float]:
    """Means of the first and the last ``1/parts`` of a run's per-step values: one step's reward is
    the mean over ``prompts_per_update`` prompts only, too noisy to compare alone; ``parts`` = the
    online-DPO arm's rounds, so that each mean covers as many samples as one of its rounds."""
    k = max(1, len(values) // parts)
    return float(np.mean(values[:k])), float(np.mean(values[-k:]))


def run_seed(p: ConfigDict, workdir: str, seed: int) -> dict[str, Any]:
    """One seed: SFT, the reward models, every cell. Returns ``{"cells": {"arm/reward": metrics}, "rm":
    {"reward_model_<steps>": quality}, "sft": {...}}``."""
    os.makedirs(workdir, exist_ok=True)
    sft_dir = os.path.join(workdir, "sft")
    rm_roots = {
        name: os.path.join(workdir, name.replace("reward_model", "rm")) for name in reward_model_names(p)
    }
    t0 = time.time()
    base = online_config(p, "grpo", "verifier", seed, sft_dir)
    model, sft_params = online_jobs.sft_stage(base, workdir)
    tok = resolve_tokenizer(base.data.tokenizer)
    gen = Generator(model, pad_id=int(tok.pad_id or 0), min_batch_bucket=8)
    sft_acc = online.greedy_accuracy(base, model, sft_params, tok, gen)
    out: dict[str, Any] = {"sft": {"task_accuracy": sft_acc, "wall_s": time.time() - t0}, "cells": {}}

    needed = {reward for _, reward in cells(p) if reward.startswith("reward_model")}
    sft_hf = os.path.join(workdir, "sft_hf")
    if needed and not os.path.exists(os.path.join(sft_hf, "config.json")):
        save_pretrained(model, sft_params, sft_hf)
    out["rm"] = {}
    for name, steps in zip(reward_model_names(p), p.rm_steps):
        if name not in needed:
            continue
        t0 = time.time()
        rm_dir = os.path.join(rm_roots[name], "hf")
        rm = reward_model.run(reward_model_config(p, seed, steps, sft_hf, rm_dir), rm_roots[name])
        out["rm"][name] = {
            "held_out_pair_accuracy": float(rm["eval/accuracy"]),
            "on_policy_pair_accuracy": on_policy_rm_accuracy(p, base, model, sft_params, rm_dir),
            "wall_s": time.time() - t0,
        }

    for arm, reward in cells(p):
        t0 = time.time()
        cdir = os.path.join(workdir, f"{arm}_{reward}")
        if arm == "offline_dpo":
            res = run_train(
                offline_dpo_config(p, seed),
                cdir,
                init_params=sft_params,
                ref_params=sft_params,
                model=model,
            )
            cell = {
                "task_accuracy/initial": sft_acc,
                "task_accuracy/final": online.greedy_accuracy(base, model, res.params, tok, gen),
            }
        else:
            rm_dir = os.path.join(rm_roots[reward], "hf") if reward in rm_roots else ""
            c = online_config(p, arm, reward, seed, sft_dir, rm_dir)
            job = {
                "online_dpo": online_jobs.run_online_dpo,
                "grpo": online_jobs.run_policy_gradient,
                "ppo": online_jobs.run_ppo,
            }[arm]
            res = job(c, cdir)
            cell = {k: float(res[k]) for k in ("task_accuracy/initial", "task_accuracy/final")}
            if arm != "online_dpo":
                rewards = [row["reward"] for row in common.read_metrics(cdir)]
                cell["reward/first"], cell["reward/last"] = first_and_last_quarter(rewards, p.rounds)
            else:
                cell["reward/first"], cell["reward/last"] = res["reward/rounds"][0], res["reward/rounds"][-1]
                cell["num_pairs"] = float(sum(res["num_pairs/rounds"]))
        cell["wall_s"] = time.time() - t0
        print(f"seed {seed} {arm}/{reward}: {cell}", flush=True)
        out["cells"][f"{arm}/{reward}"] = cell
    return out


def reward_label(reward: str) -> str:
    """The table's name of a reward source: ``reward_model_400`` -> ``reward model (400 steps)``."""
    if reward.startswith("reward_model_"):
        return f"reward model ({reward.rsplit('_', 1)[1]} steps)"
    return reward.replace("_", " ")


@contextlib.contextmanager
def compilation_cache(p: ConfigDict, workdir: str) -> Iterator[None]:
    """JAX's persistent compilation cache in ``config.repro.compilation_cache`` ("" = ``<workdir>/jax_cache``,
    "off" = none) for the duration: every arm and seed builds its own jitted programs (generator, steps,
    evaluation), most of them the same programs, so all but the first of each are read from disk instead
    of compiled (compiling is most of a cell's time at this size). The previous settings are restored
    after."""
    where = p.get("compilation_cache", "")
    if where == "off":
        yield
        return
    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {k: getattr(jax.config, k) for k in keys}
    for k, v in zip(keys, (where or os.path.join(workdir, "jax_cache"), 0.0, 0)):
        jax.config.update(k, v)
    cc.reset_cache()  # the cache is set up once per process: again, with these settings
    try:
        yield
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
        cc.reset_cache()


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Every seed (``config.repro.seeds``), then the table: task accuracy per cell (mean ± sd over seeds),
    its gain over the SFT model, per-seed values, and the reward model's quality."""
    p = common.repro_params(config, "repro_online_vs_offline")
    t0 = time.time()
    seeds = list(p.seeds)
    keys = [f"{a}/{r}" for a, r in cells(p)]
    with compilation_cache(p, workdir):
        per_seed = {s: run_seed(p, os.path.join(workdir, f"seed{s}"), s) for s in seeds}

    def vals(key: str, metric: str) -> list[float]:
        return [per_seed[s]["cells"][key][metric] for s in seeds]

    sft = [per_seed[s]["sft"]["task_accuracy"] for s in seeds]
    header = [
        "arm",
        "reward",
        "held-out task accuracy",
        "gain over SFT",
        "training reward (first -> last quarter of the run)",
        "per seed",
        "wall s / seed",
    ]
    table = [
        [
            "SFT (start of every arm)",
            "-",
            common.fmt(sft),
            "-",
            "-",
            ", ".join(f"{v:.3f}" for v in sft),
            f"{np.mean([per_seed[s]['sft']['wall_s'] for s in seeds]):.0f}",
        ]
    ]
    for key in keys:
        arm, reward = key.split("/")
        final = vals(key, "task_accuracy/final")
        gain = [f - i for f, i in zip(final, vals(key, "task_accuracy/initial"))]
        trained = (
            f"{common.fmt(vals(key, 'reward/first'), 2)} -> {common.fmt(vals(key, 'reward/last'), 2)}"
            if arm != "offline_dpo"
            else "-"
        )
        table.append(
            [
                arm,
                reward_label(reward),
                common.fmt(final),
                common.fmt(gain),
                trained,
                ", ".join(f"{v:.3f}" for v in final),
                f"{np.mean(vals(key, 'wall_s')):.0f}",
            ]
        )
    markdown = common.markdown_table(header, table)
    names = [n for n in reward_model_names(p) if all(n in per_seed[s]["rm"] for s in seeds)]
    if names:
        rows = []
        for name in names:
            for metric, what in (
                ("held_out_pair_accuracy", "held-out pair accuracy (arithmetic_dpo:val)"),
                ("on_policy_pair_accuracy", "pair accuracy on the SFT policy's samples (verifier-separated)"),
            ):
                v = [per_seed[s]["rm"][name][metric] for s in seeds]
                rows.append([reward_label(name), what, common.fmt(v), ", ".join(f"{x:.3f}" for x in v)])
        markdown += "\n\n" + common.markdown_table(["reward model", "quality", "mean ± sd", "per seed"], rows)
    wall = time.time() - t0
    common.write_table(workdir, {"seeds": per_seed, "config": p.to_dict(), "wall_s": wall}, markdown)
    print(markdown, flush=True)
    return {"seeds": per_seed, "markdown": markdown, "wall_s": wall}
