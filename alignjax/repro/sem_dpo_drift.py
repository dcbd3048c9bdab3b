"""Reproduction: Sem-DPO vs DPO when the preference labels favour semantically drifted responses.

Claim ("Sem-DPO: Mitigating Semantic Inconsistency in Preference Optimization for Prompt Engineering";
objectives.md): preference optimisation on labels from a reward that does not check meaning drifts
away from the input's meaning; weighting each pair's DPO loss by W = exp(-alpha d_cos(e(x), e(y_w)))
(sentence embeddings) keeps the learned outputs semantically consistent with the input while keeping
most of the preference gain.

Task (synthetic, tabular): P prompts x K responses. Each prompt has a topic, a random unit vector e(x)
in R^E; each response has an embedding e(y) = its topic's vector + ``embed_noise`` N(0, 1/E) noise, the
prompt's own topic except for a share ``drift_share`` that takes a random other topic ("drifted"), and
a quality q ~ N(0, 1). The rater scores s = q + ``drift_bonus`` * drifted (drifted outputs look better
to a rater that ignores meaning, as aesthetic keywords do for prompt rewriting) and each label is
sampled from Bradley-Terry on s (so both orders of a pair occur and the weights change the optimum,
not only the speed). The semantic distance of each pair is the library's ``cosine_distance`` of e(x) and
e(y_w), a per-example column as the trainer reads it. The policy is a logit table, the reference
uniform; losses: the library's ``dpo`` and ``sem_dpo`` (sem_alpha in ``config.repro.alphas``), full-batch
Adam. Metrics under the policy: the share of drifted responses, E[cos(e(x), e(y))], E[q] and the
rater's E[s].

    python -m alignjax.main --config=experiments/repro_sem_dpo_drift.py --workdir=workdirs/repro_sem_dpo
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import alignjax.losses as losses
from alignjax.losses import modifiers
from alignjax.repro import common
from alignjax.repro.wpo_offpolicy import log_softmax


def make_task(
    seed: int,
    *,
    num_prompts: int,
    num_responses: int,
    pairs_per_prompt: int,
    embed_dim: int,
    embed_noise: float,
    drift_share: float,
    drift_bonus: float,
) -> dict[str, np.ndarray]:
    """Per response [P, K]: quality, drifted, rater score, similarity to the prompt, embedding [P, K, E];
    topics [P, E]; pairs with the semantic distance of their chosen response [N]."""
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(num_prompts, embed_dim))
    topics /= np.linalg.norm(topics, axis=-1, keepdims=True)
    drifted = rng.random((num_prompts, num_responses)) < drift_share
    other = (np.arange(num_prompts)[:, None] + rng.integers(1, num_prompts, drifted.shape)) % num_prompts
    topic_of = np.where(drifted, other, np.arange(num_prompts)[:, None])
    emb = topics[topic_of] + embed_noise * rng.normal(size=drifted.shape + (embed_dim,)) / np.sqrt(embed_dim)
    quality = rng.normal(size=drifted.shape)
    score = quality + drift_bonus * drifted
    sim = 1.0 - np.asarray(_cosine_distance(np.broadcast_to(topics[:, None], emb.shape), emb))
    prompt = np.repeat(np.arange(num_prompts), pairs_per_prompt)
    i = rng.integers(0, num_responses, prompt.size)
    j = (i + rng.integers(1, num_responses, prompt.size)) % num_responses
    i_wins = rng.random(prompt.size) < 1.0 / (1.0 + np.exp(-(score[prompt, i] - score[prompt, j])))
    w, lo = np.where(i_wins, i, j), np.where(i_wins, j, i)
    distance = np.asarray(_cosine_distance(topics[prompt], emb[prompt, w]))
    return dict(
        quality=quality,
        drifted=drifted,
        score=score,
        similarity=sim,
        prompt=prompt,
        chosen=w,
        rejected=lo,
        semantic_distance=distance.astype(np.float32),
        topics=topics,
        embeddings=emb,
    )


_cosine_distance = jax.jit(modifiers.cosine_distance)  # one compile, not one per eager op


def train(
    task: dict[str, np.ndarray],
    method: str,
    *,
    beta: float,
    alpha: float,
    steps: int,
    lr: float,
) -> np.ndarray:
    """Full-batch Adam on the logit table [P, K]; returns the final logits."""
    arrays = (jnp.asarray(task[n]) for n in ("prompt", "chosen", "rejected", "semantic_distance"))
    return np.asarray(
        _fit(
            *arrays,
            shape=task["quality"].shape,
            sem=method == "sem_dpo",
            beta=float(beta),
            alpha=float(alpha),
            steps=int(steps),
            lr=float(lr),
        )
    )


@functools.partial(jax.jit, static_argnames=("shape", "sem", "beta", "alpha", "steps", "lr"))
def _fit(
    prompt: jax.Array,
    w: jax.Array,
    lo: jax.Array,
    dist: jax.Array,
    *,
    shape: tuple[int, int],
    sem: bool,
    beta: float,
    alpha: float,
    steps: int,
    lr: float,
) -> jax.Array:
    ref = jnp.zeros(shape, jnp.float32)
    dpo, sem_dpo = losses.get("dpo"), losses.get("sem_dpo")

    def objective(theta):
        lp, lq = jax.nn.log_softmax(theta, -1), jax.nn.log_softmax(ref, -1)
        args = (lp[prompt, w], lp[prompt, lo], lq[prompt, w], lq[prompt, lo])
        if sem:
            return jnp.mean(sem_dpo(*args, dist, beta=beta, sem_alpha=alpha))
        return jnp.mean(dpo(*args, beta=beta))

    tx = optax.adam(lr)

    def step(_, carry):
        theta, opt = carry
        upd, opt = tx.update(jax.grad(objective)(theta), opt)
        return optax.apply_updates(theta, upd), opt

    theta, _ = jax.lax.fori_loop(0, steps, step, (ref, tx.init(ref)))
    return theta


def policy_row(logits: np.ndarray, task: dict[str, np.ndarray]) -> dict[str, float]:
    """Expectations under the policy, averaged over prompts."""
    p = np.exp(log_softmax(logits))
    return {
        name: float(np.mean(np.sum(p * task[key], -1)))
        for name, key in (
            ("drifted_share", "drifted"),
            ("similarity", "similarity"),
            ("quality", "quality"),
            ("rater_score", "score"),
        )
    }


METRICS = ("drifted_share", "similarity", "quality", "rater_score")


def run(config: Any, workdir: str) -> dict[str, Any]:
    p = common.repro_params(config, "repro_sem_dpo_drift")
    seeds = list(p.seeds)
    runs = [
        ("reference", "reference", 0.0),
        ("dpo", "dpo", 0.0),
        *((f"sem_dpo alpha={a:g}", "sem_dpo", float(a)) for a in p.alphas),
    ]
    rows: dict[str, dict[int, dict[str, float]]] = {name: {} for name, _, _ in runs}
    for seed in seeds:
        task = make_task(
            seed,
            num_prompts=p.num_prompts,
            num_responses=p.num_responses,
            pairs_per_prompt=p.pairs_per_prompt,
            embed_dim=p.embed_dim,
            embed_noise=p.embed_noise,
            drift_share=p.drift_share,
            drift_bonus=p.drift_bonus,
        )
        for name, method, alpha in runs:
            if method == "reference":
                logits = np.zeros(task["quality"].shape, np.float32)
            else:
                logits = train(task, method, beta=p.beta, alpha=alpha, steps=p.steps, lr=p.learning_rate)
            rows[name][seed] = policy_row(logits, task)
    header = ["policy", "drifted share", "E[cos(e(x), e(y))]", "E[quality]", "E[rater score]"]
    table = [
        [f"`{name}`", *(common.fmt([rows[name][s][k] for s in seeds]) for k in METRICS)]
        for name, _, _ in runs
    ]
    markdown = common.markdown_table(header, table)
    common.write_table(workdir, {"rows": rows, "config": p.to_dict()}, markdown)
    return {"rows": rows, "markdown": markdown}
