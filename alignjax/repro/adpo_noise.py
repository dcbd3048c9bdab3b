"""Reproduction: ADPO (soft targets, anchored) vs DPO under 0-40% flipped preference labels.

Claim (ADPO, "Anchored Direct Preference Optimization"; objectives.md): soft preference targets and an
anchored log-ratio make preference optimisation robust to noisy labels, where DPO fits the flips.

Task (synthetic, tabular): P prompts x K responses with true rewards r ~ N(0, 1); a policy is a table of
logits (softmax over K per prompt), the reference is uniform. Training pairs (i, j) per prompt are labelled
by the true reward, then each label is flipped with probability ``noise``. A scorer gives each response a
noisy score s = r + sigma_s xi (independent of the flips); ADPO's soft target is
q = s((s_w - s_l) / T) for the labelled direction. Losses (library functions, full-batch Adam):
``dpo`` (beta), ``adpo`` with q and the reference as a fixed anchor (tau = 1/beta), and ``adpo`` with q and a
dynamic anchor (the policy, re-anchored every ``anchor_every`` steps). Metric: the policy's pairwise
ranking accuracy against the true rewards over all K(K-1)/2 response pairs of every prompt, and the
expected true reward under the policy. ``adpo_label_only`` uses no scorer: q = 1 - 0.2 for every labelled
pair (a soft target from the label alone), fixed anchor.

Note: the soft pairwise loss is symmetric under swapping (y_w, y_l) together with q -> 1 - q, so with a
scorer-derived q the flipped labels change nothing; the robustness then comes from the scorer, which DPO
does not see. ``adpo_label_only`` is the comparison on equal information.

    python -m alignjax.main --config=experiments/repro_adpo_noise.py --workdir=workdirs/repro_adpo
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import alignjax.losses as losses
from alignjax.repro import common


def make_task(
    seed: int,
    num_prompts: int,
    num_responses: int,
    pairs_per_prompt: int,
    noise: float,
    score_noise: float,
    temperature: float,
) -> dict[str, np.ndarray]:
    """True rewards [P, K]; pairs (prompt, chosen, rejected) with flipped labels; soft targets q [N]."""
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(num_prompts, num_responses))
    prompt = np.repeat(np.arange(num_prompts), pairs_per_prompt)
    i = rng.integers(0, num_responses, prompt.size)
    j = (i + rng.integers(1, num_responses, prompt.size)) % num_responses  # j != i
    better = r[prompt, i] >= r[prompt, j]
    w, lo = np.where(better, i, j), np.where(better, j, i)
    flip = rng.random(prompt.size) < noise
    w, lo = np.where(flip, lo, w), np.where(flip, w, lo)
    s = r + score_noise * rng.normal(size=r.shape)
    q = 1.0 / (1.0 + np.exp(-(s[prompt, w] - s[prompt, lo]) / temperature))
    return dict(rewards=r, prompt=prompt, chosen=w, rejected=lo, q=q.astype(np.float32), flipped=flip)


def true_ranking_accuracy(logits: np.ndarray, rewards: np.ndarray) -> float:
    """Share of response pairs (per prompt, r_i != r_j) that the policy orders as the true rewards do."""
    dl = logits[:, :, None] - logits[:, None, :]
    dr = rewards[:, :, None] - rewards[:, None, :]
    upper = np.triu(np.ones(dr.shape[1:], bool), 1)[None] & (dr != 0)
    return float(np.mean((np.sign(dl) == np.sign(dr))[upper]))


def expected_reward(logits: np.ndarray, rewards: np.ndarray) -> float:
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return float(np.mean(np.sum(p * rewards, -1)))


def train(
    task: dict[str, np.ndarray],
    method: str,
    *,
    beta: float,
    steps: int,
    lr: float,
    anchor_every: int,
    smoothing: float = 0.2,
) -> np.ndarray:
    """Full-batch Adam on the logit table; returns the final logits [P, K]."""
    p_, k = task["rewards"].shape
    prompt, w, lo = (jnp.asarray(task[n]) for n in ("prompt", "chosen", "rejected"))
    q = jnp.asarray(task["q"])
    ref = jnp.zeros((p_, k), jnp.float32)
    dpo, adpo = losses.get("dpo"), losses.get("adpo")

    def logps(theta):
        lp = jax.nn.log_softmax(theta, -1)
        return lp[prompt, w], lp[prompt, lo]

    def loss_fn(theta, anchor):
        sw, sl = logps(theta)
        aw, al = logps(anchor)
        if method == "dpo":
            return jnp.mean(dpo(sw, sl, aw, al, beta=beta))
        target = jnp.full_like(q, 1.0 - smoothing) if method == "adpo_label_only" else q
        return jnp.mean(adpo(sw, sl, aw, al, target, tau=1.0 / beta))

    tx = optax.adam(lr)

    @jax.jit
    def step(theta, opt, anchor):
        g = jax.grad(loss_fn)(theta, anchor)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(theta, upd), opt

    theta, opt, anchor = ref, tx.init(ref), ref
    for t in range(steps):
        if method == "adpo_dynamic" and t % anchor_every == 0:
            anchor = theta
        theta, opt = step(theta, opt, anchor)
    return np.asarray(theta)


METHODS = ("dpo", "adpo_label_only", "adpo_fixed_anchor", "adpo_dynamic")


def run(config: Any, workdir: str) -> dict[str, Any]:
    p = common.repro_params(config, "repro_adpo_noise")
    rows: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    for noise in p.noise_levels:
        rows[f"{noise:.1f}"] = {m: {} for m in METHODS}
        for seed in p.seeds:
            task = make_task(
                seed, p.num_prompts, p.num_responses, p.pairs_per_prompt, noise, p.score_noise, p.temperature
            )
            for m in METHODS:
                logits = train(
                    task, m, beta=p.beta, steps=p.steps, lr=p.learning_rate, anchor_every=p.anchor_every
                )
                rows[f"{noise:.1f}"][m][seed] = {
                    "ranking_accuracy": true_ranking_accuracy(logits, task["rewards"]),
                    "expected_reward": expected_reward(logits, task["rewards"]),
                }
    seeds = list(p.seeds)
    header = [
        "flipped labels",
        *(f"{m}: true ranking acc." for m in METHODS),
        *(f"{m}: E[r]" for m in METHODS),
    ]
    table = []
    for noise, per in rows.items():
        acc = [common.fmt([per[m][s]["ranking_accuracy"] for s in seeds]) for m in METHODS]
        rew = [common.fmt([per[m][s]["expected_reward"] for s in seeds]) for m in METHODS]
        table.append([f"{float(noise):.0%}", *acc, *rew])
    markdown = common.markdown_table(header, table)
    common.write_table(workdir, {"rows": rows, "config": p.to_dict()}, markdown)
    return {"rows": rows, "markdown": markdown}
