"""The online methods' pieces (their jobs: :mod:`alignjax.jobs.online`): GRPO / RLOO as an objective of
the shared train loop, and online (iterative) DPO's pairs.

GRPO / RLOO: :class:`PolicyGradientObjective` (the :class:`alignjax.train.objective.Objective` that
:func:`alignjax.train.loop.run_train` takes). Each step the data pipeline gives prompts (the prompt
part of ``config.data.kind='sft'`` rows; their completions are not used); the objective's
``prepare_batch`` samples ``config.online.num_generations`` completions of each from the current
policy (:mod:`alignjax.online.rollout`, keys folded from the seed, the step and the micro-batch, so a
rerun samples the same), scores them (:func:`make_reward_source`, :func:`score`) and the jitted step
(:func:`make_train_step`) then takes ``config.online.num_iterations`` optimiser steps on that rollout
batch (TRL's ``num_iterations``; the first is on-policy, ratio 1), with the loss
:func:`alignjax.losses.policy_gradient.grpo` (advantages
:func:`alignjax.losses.policy_gradient.group_advantages`, ``config.online.scale_rewards``) or ``rloo``
(KL-penalised rewards, leave-one-out advantages,
``config.online.normalize_advantages``). Metrics per step use TRL's names: ``reward``,
``reward_std``, ``frac_reward_zero_std``, ``kl`` (beta != 0), ``clip_ratio/low_mean``,
``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``completions/mean_length``,
``completions/min_length``, ``completions/max_length``, ``completions/clipped_ratio``.

Online DPO: :func:`build_pairs` (``pairs='best_worst'``: the best against the worst completion of each
prompt; ``'all'``: every pair with a reward gap, its gap as the record's ``margin``) from each round's
prompts (:func:`round_prompts`). Shared by both: the
built-in task's held-out prompts and greedy accuracy under its verifier (:func:`held_out_prompts`,
:func:`greedy_accuracy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import alignjax.losses as losses
from alignjax import flops
from alignjax.data import synthetic
from alignjax.eval.task_accuracy import completion_text, greedy_correct
from alignjax.losses import policy_gradient as pg
from alignjax.models import from_pretrained, lora
from alignjax.online import rewards as rewardlib
from alignjax.online import rollout
from alignjax.search.generate import Generator
from alignjax.train import step as steplib

ALGORITHMS = ("grpo", "rloo")
PAIRINGS = ("best_worst", "all")


# ------------------------------------------------------------------------------------------ pieces


def sampling_config(config: Any, eos_id: int) -> rollout.SamplingConfig:
    o = config.online
    return rollout.SamplingConfig(
        num_generations=int(o.num_generations), max_new_tokens=int(o.max_new_tokens),
        temperature=float(o.temperature), top_p=float(o.top_p), top_k=int(o.top_k),
        stop_tokens=(int(eos_id),))


def task_name(config: Any) -> str:
    """``config.online.verifier`` or the built-in task ``config.data.source`` names."""
    name = config.online.verifier
    if name:
        return name
    source = config.data.source
    for task in ("multistep", "arithmetic"):
        if source.startswith(f"synthetic:{task}"):
            return task
    raise ValueError(f"config.online.verifier is empty and config.data.source={source!r} is not a built-in "
                     "task: name the verifier (arithmetic | multistep)")


def make_reward_source(config: Any, model: Any = None, params: Any = None,
                       tokenizer: Any = None) -> rewardlib.RewardSource:
    """``config.online.reward``: ``verifier`` (the task's, 1 correct / 0 wrong), ``reward_model``
    (an exported reward model at ``reward_path``), ``flr`` (Follow-up Likelihood as Reward under the LM
    at ``reward_path``, "" = ``model``/``params``, with ``follow_ups`` / ``negative_follow_ups``, texts
    joined by ``|``)."""
    o = config.online
    if o.reward == "verifier":
        return rewardlib.VerifierReward(rewardlib.builtin_verifier(task_name(config)))
    if o.reward == "reward_model":
        if not o.reward_path:
            raise ValueError("config.online.reward='reward_model' needs config.online.reward_path (an "
                             "exported reward model: experiments/reward_model.py, config.reward.export_dir)")
        return rewardlib.RewardModelReward.from_dir(o.reward_path)
    if o.reward == "flr":
        if o.reward_path:

            model = from_pretrained(o.reward_path)
            params = model.params
        encode = lambda texts: [list(tokenizer.encode(t)) for t in texts.split("|") if t]
        return rewardlib.FollowUpLikelihoodReward(model, params, encode(o.follow_ups),
                                                  encode(o.negative_follow_ups))
    raise ValueError(f"config.online.reward={o.reward!r}; choose one of ['verifier', 'reward_model', 'flr']")


def score(source: rewardlib.RewardSource, tokenizer: Any, ro: rollout.Rollout, config: Any) -> np.ndarray:
    """[R] rewards of a rollout's rows (normalised per ``config.online.reward_normalization``)."""
    prompts, comps = ro.repeated_prompts(), ro.completions()
    samples = rewardlib.Samples([tokenizer.decode(p) for p in prompts],
                                [completion_text(tokenizer, c) for c in comps], prompts, comps)
    r = np.asarray(source(samples), np.float32)
    return rewardlib.normalize_rewards(r, config.online.reward_normalization,
                                       num_generations=ro.num_generations)


# The built-in sources' splits (``synthetic:<task>:<split>``) are those of split seed 0, whatever
# config.seed is: held-out and round prompts come from the same splits, so test prompts stay unseen.
SPLIT_SEED = 0


def held_out_prompts(config: Any) -> list[str]:
    """The built-in task's test prompts (``config.online.num_test`` of them)."""

    n, task = int(config.online.num_test), task_name(config)
    if task == "arithmetic":
        return [synthetic.arithmetic_prompt(*p) for p in synthetic.arithmetic_splits(SPLIT_SEED)["test"][:n]]
    return [synthetic.multistep_prompt(*p) for p in synthetic.multistep_splits(SPLIT_SEED)["test"][:n]]


def greedy_accuracy(config: Any, model: Any, params: Any, tokenizer: Any, generator: Generator) -> float:
    """Share of the held-out prompts whose greedy completion the task's verifier accepts (``model`` is
    ``generator``'s)."""
    correct = greedy_correct(
        generator, params, tokenizer, held_out_prompts(config), rewardlib.builtin_verifier(task_name(config)),
        max_new_tokens=int(config.online.eval_max_new_tokens), prompt_ids=tokenizer.encode,
    )  # fmt: skip
    return float(correct.mean())


# ------------------------------------------------------------------------------------------ GRPO / RLOO


@dataclasses.dataclass(frozen=True)
class PolicyGradientSpec:
    """The static description of a GRPO/RLOO step (what the loop reads from a step spec)."""

    loss: str  # grpo | rloo
    hyperparameters: tuple[tuple[str, Any], ...]
    batch_size: int  # prompts per micro-batch (global)
    num_generations: int
    max_new_tokens: int
    temperature: float
    num_iterations: int
    scale_rewards: str
    normalize_advantages: bool
    reference: str  # "model" (beta != 0) | "none"
    kind: str = "sft"
    nan_at_step: int = -1
    stateful: bool = False

    @property
    def beta(self) -> float:
        return float(dict(self.hyperparameters).get("beta", 0.0))


def loss_hyperparameters(config_loss: Any, allowed: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``config.loss``'s hyperparameters (every key but the loss's name and mixing keys), each one
    that ``allowed`` names; another key is an error naming it and ``what`` (the loss)."""
    hyper = {}
    for key, value in config_loss.items():
        if key in ("name", "weights", "module", "nll_weight"):
            continue
        if key not in allowed:
            raise ValueError(f"config.loss.{key}: {what} has no hyperparameter {key!r}; its "
                             f"hyperparameters: {sorted(allowed)}")
        hyper[key] = value
    return hyper


def make_spec(config: Any, batch_size: int, reference: str) -> PolicyGradientSpec:
    """The spec of ``config.job`` (grpo | rloo) from ``config.loss`` and ``config.online``; a key the
    loss does not take is an error naming it."""
    algorithm = config.job
    if algorithm not in ALGORITHMS:
        raise ValueError(f"config.job={algorithm!r}: the policy-gradient job runs {ALGORITHMS}")
    if config.loss.name != algorithm:
        raise ValueError(f"config.loss.name={config.loss.name!r}: the {algorithm} job trains the "
                         f"{algorithm!r} loss")
    if config.data.kind != "sft" or config.data.layout != "padded":
        raise ValueError(f"config.data.kind={config.data.kind!r}, layout={config.data.layout!r}: the "
                         f"{algorithm} job reads prompts from padded 'sft' rows")

    # RLOO's beta weighs the KL in the reward, not a term of its loss (TRL's RLOOConfig.beta).
    allowed = {**losses.spec(algorithm).hyperparameters, **({"beta": 0.05} if algorithm == "rloo" else {})}
    hyper = loss_hyperparameters(config.loss, allowed, f"the {algorithm} loss")
    o = config.online
    if o.scale_rewards not in pg.SCALE_REWARDS:
        raise ValueError(f"config.online.scale_rewards={o.scale_rewards!r}; choose one of {pg.SCALE_REWARDS}")
    beta = float(hyper.get("beta", 0.0))
    if beta != 0.0 and config.reference.kind != "frozen":
        raise ValueError(f"config.reference.kind={config.reference.kind!r}: a KL to the reference "
                         f"(beta={beta}) needs kind='frozen' (or beta=0)")
    return PolicyGradientSpec(
        loss=algorithm, hyperparameters=tuple(sorted(hyper.items())), batch_size=int(batch_size),
        num_generations=int(o.num_generations), max_new_tokens=int(o.max_new_tokens),
        temperature=float(o.temperature), num_iterations=int(o.num_iterations), scale_rewards=o.scale_rewards,
        normalize_advantages=bool(o.normalize_advantages), reference="model" if beta != 0.0 else "none",
        nan_at_step=int(config.train.get("nan_at_step", -1)))


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_loss_fn(model: Any, spec: PolicyGradientSpec):
    """``loss_fn(params, ref_params, loss_state, batch) -> (loss, (metrics, None))`` on a rollout batch
    (``alignjax.train.step.make_train_step``'s signature)."""
    hyper = dict(spec.hyperparameters)
    G, T = spec.num_generations, spec.temperature

    def loss_fn(params: Any, ref_params: Any, loss_state: Any, batch: Mapping[str, jax.Array]):
        mask, old = batch["loss_mask"], batch["old_token_logps"]
        lp = rollout.teacher_forced_logps(model, params, batch, T)
        ref = None
        if spec.beta != 0.0:
            ref = jax.lax.stop_gradient(
                rollout.teacher_forced_logps(model, lora.reference_params(params, ref_params), batch, T))
        r = batch["rewards"]
        metrics: dict[str, jax.Array] = {}
        if spec.loss == "grpo":
            adv = pg.group_advantages(r, num_generations=G, scale_rewards=spec.scale_rewards)
            kw = {k: v for k, v in hyper.items() if k != "max_completion_length"}
            loss, m = pg.grpo(lp, old, ref, mask, adv, **kw, max_completion_length=spec.max_new_tokens)
        else:
            penalised = r if ref is None else pg.kl_penalized_rewards(r, old, ref, mask, beta=spec.beta)
            adv = pg.rloo_advantages(penalised, num_generations=G, normalize=spec.normalize_advantages)
            kw = {k: v for k, v in hyper.items() if k != "beta"}
            loss, m = pg.rloo(lp, jnp.sum(old * mask, -1), mask, adv, **kw)
            if ref is not None:  # TRL's RLOO logs the first-order per-token KL it puts in the reward
                metrics["kl"] = _masked_mean(old - ref, mask)
        lengths = jnp.sum(mask, -1)
        grouped = r.reshape(-1, G)
        metrics.update(m)
        metrics.update({
            "loss": loss,
            "reward": jnp.nanmean(r),
            "reward_std": pg.nanstd(r),
            "frac_reward_zero_std": jnp.mean(jnp.isclose(pg.nanstd(grouped, axis=1), 0.0), dtype=jnp.float32),
            "completions/mean_length": jnp.mean(lengths),
            "completions/min_length": jnp.min(lengths),
            "completions/max_length": jnp.max(lengths),
            "completions/clipped_ratio": 1.0 - jnp.mean(batch["stopped"]),
        })
        return loss, (metrics, None)

    return loss_fn


def make_train_step(model: Any, spec: PolicyGradientSpec, tx: Any, schedule: Any, **kwargs: Any):
    """``num_iterations`` applications of ``alignjax.train.step.make_train_step`` (with this loss) to
    one rollout batch; metrics are the mean over the iterations (a non-finite one: its code)."""

    inner = steplib.make_train_step(model, spec, tx, schedule, loss_fn=make_loss_fn(model, spec), **kwargs)

    def step(state: Any, batch: Any):
        history = []
        for _ in range(spec.num_iterations):
            state, metrics = inner(state, batch)
            history.append(metrics)
        out = {k: jnp.mean(jnp.stack([m[k] for m in history])) for k in history[0]}
        out[steplib.NONFINITE] = jnp.max(jnp.stack([m[steplib.NONFINITE] for m in history]))
        return state, out

    return step


class PolicyGradientObjective:
    """The loop hook for GRPO/RLOO (see the module docstring)."""

    def __init__(self, config: Any, tokenizer: Any, source: rewardlib.RewardSource, generator: Generator):
        self.config, self.tokenizer, self.source, self.generator = config, tokenizer, source, generator
        self.sampling = sampling_config(config, tokenizer.eos_id)
        self.pad_id = int(tokenizer.pad_id or 0)

    def make_step_spec(self, config: Any, batch_size: int, reference: str) -> PolicyGradientSpec:
        return make_spec(config, batch_size, reference)

    make_train_step = staticmethod(make_train_step)

    @staticmethod
    def make_eval_fn(model: Any, spec: PolicyGradientSpec):
        return lambda params, ref_params, batch: {}

    @staticmethod
    def evaluate(eval_fn: Any, params: Any, ref_params: Any, batches: list, beta: float) -> dict[str, float]:
        return {}

    @staticmethod
    def model_flops(model: Any, spec: PolicyGradientSpec, host: Mapping[str, Any]) -> float:
        """The policy's forward + backward per iteration and the reference forward (beta != 0); the
        sampling itself is not counted."""
        f = flops.step_flops(model.config, host, reference_forward=spec.reference == "model")
        return spec.num_iterations * f["policy"] + f["reference"]

    def prepare_batch(self, state: Any, micro: list[dict[str, np.ndarray]], step: int) -> list[dict]:
        """Each micro-batch's prompts -> a scored rollout batch from ``state['params']``."""
        out = []
        for j, host in enumerate(micro):
            prompts = rollout.prompts_from_batch(host)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 1), step), j)
            ro = rollout.sample(self.generator, state["params"], prompts, key, self.sampling)
            batch = rollout.sequence_batch(ro, host["input_ids"].shape[1] + self.sampling.max_new_tokens,
                                           self.pad_id)
            batch["rewards"] = score(self.source, self.tokenizer, ro, self.config)
            out.append(batch)
        return out


# ------------------------------------------------------------------------------------------ online DPO


def build_pairs(prompts: Sequence[str], completions: Sequence[str], rewards: np.ndarray, num_generations: int,
                pairing: str = "best_worst", *, scores: bool = False) -> list[dict[str, Any]]:
    """Preference records from G scored completions per prompt (rows ``i G .. i G + G - 1``):
    ``best_worst``: the highest- against the lowest-reward completion (none when they tie);
    ``all``: every pair with a reward gap, the gap as ``margin``. Blank completions and identical texts
    are skipped; NaN rewards are ignored. ``scores``: each record also carries its two rewards as
    ``score_chosen`` / ``score_rejected`` (what :func:`alignjax.online.relabel.relabel` reads)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"config.online.pairs={pairing!r}; choose one of {list(PAIRINGS)}")
    G = int(num_generations)
    records = []
    for i in range(len(completions) // G):
        rows = [(float(rewards[i * G + j]), completions[i * G + j]) for j in range(G)]
        rows = [(r, c) for r, c in rows if np.isfinite(r) and c.strip()]
        if pairing == "best_worst":
            if len(rows) < 2:
                continue
            order = sorted(range(len(rows)), key=lambda k: rows[k][0])
            lo, hi = rows[order[0]], rows[order[-1]]
            if hi[0] > lo[0] and hi[1] != lo[1]:
                records.append({"prompt": prompts[i * G], "chosen": hi[1], "rejected": lo[1],
                                **({"score_chosen": hi[0], "score_rejected": lo[0]} if scores else {})})
            continue
        for a in range(len(rows)):
            for b in range(len(rows)):
                if rows[a][0] > rows[b][0] and rows[a][1] != rows[b][1]:
                    records.append({"prompt": prompts[i * G], "chosen": rows[a][1], "rejected": rows[b][1],
                                    "margin": rows[a][0] - rows[b][0],
                                    **({"score_chosen": rows[a][0], "score_rejected": rows[b][0]}
                                       if scores else {})})
    return records


def round_prompts(config: Any, round_index: int) -> list[str]:
    """Round ``k``'s training prompts: slice ``k`` of a seeded permutation of the task's train split."""

    task, n = task_name(config), int(config.online.prompts_per_round)
    if task == "arithmetic":
        pool = [synthetic.arithmetic_prompt(*p) for p in synthetic.arithmetic_splits(SPLIT_SEED)["train"]]
    else:
        pool = [synthetic.multistep_prompt(*p) for p in synthetic.multistep_splits(SPLIT_SEED)["train"]]
    order = np.random.default_rng([config.seed, 3]).permutation(len(pool))
    return [pool[order[(round_index * n + i) % len(pool)]] for i in range(n)]


