"""Reproduction: SparsePO vs DPO when only a few tokens of each response carry the preference.

Claim ("SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks", Christopoulou et al.,
arXiv 2410.05102): not every token of a response matters for the preference; masks on the token-level
reward and KL terms let preference optimisation change the tokens that carry it and leave the rest
near the reference, so the policy gains the preferred behaviour with less divergence elsewhere.

Task (synthetic, tabular): P prompts, responses of T tokens over V tokens, sampled from the reference
(per-position random logits, ``ref_scale`` N(0, 1)); the policy is the reference plus a trainable table
[P, T, V] (zero at the start). Only the first ``signal_positions`` positions carry the reward:
r(y) = sum_{t < S} R[p, t, y_t], R ~ N(0, 1); the other positions are filler that differs between chosen
and rejected at random. The chosen response of each pair has the higher reward. Losses (the library's
``dpo`` on summed log-probs and ``sparsepo`` on token log-probs, k_t = sum_v pi_ref (log pi - log pi_ref)
per token, as the trainer's ``token_kl``):

- ``dpo``;
- ``sparsepo_learned``: one shared reward/KL mask m = sigmoid(mu[t, v]) learned jointly (a table over
  position and token shared by all prompts: the tabular stand-in for the paper's mask head on reference
  states), mu = 0 at the start (m = 0.5), L1 weights ``l1`` each (official code: both norms added),
  for each l1 of ``config.repro.l1_levels``;
- ``sparsepo_oracle``: a given mask, 1 on the reward positions and 0 on the filler (what a perfect mask
  would be; an upper bound on what masking can do here).

Plain full-batch gradient descent: with a table, Adam's per-coordinate normalisation would cancel any
fixed per-token scale such as a mask (a masked token's update would be as large as an unmasked one);
in a network the parameters are shared and the mask's scale survives. Metrics: the gain in expected
true reward E_pi[r] - E_ref[r], KL(pi || ref) on the filler positions and on the reward positions
(exact; the policy factorises over positions), and for the learned mask its mean on each kind.

    python -m alignjax.main --config=experiments/repro_sparsepo_tokens.py --workdir=workdirs/repro_sparsepo
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import alignjax.losses as losses
from alignjax.repro import common
from alignjax.repro.wpo_offpolicy import log_softmax, untied_per_prompt

METHODS = ("dpo", "sparsepo_learned", "sparsepo_oracle")


def make_task(
    seed: int,
    *,
    num_prompts: int,
    length: int,
    vocab: int,
    signal_positions: int,
    pairs_per_prompt: int,
    ref_scale: float,
) -> dict[str, np.ndarray]:
    """Reference logits [P, T, V], rewards [P, T, V] (0 on filler positions), pairs [N, T] + prompt [N]."""
    rng = np.random.default_rng(seed)
    ref = ref_scale * rng.normal(size=(num_prompts, length, vocab))
    rewards = rng.normal(size=(num_prompts, length, vocab))
    rewards[:, signal_positions:] = 0.0
    prompt = np.repeat(np.arange(num_prompts), 2 * pairs_per_prompt)  # ties dropped below
    p = np.exp(ref - ref.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)

    def sample() -> np.ndarray:
        u = rng.random((prompt.size, length, 1))
        return np.minimum((np.cumsum(p[prompt], -1) < u).sum(-1), vocab - 1)

    a, b = sample(), sample()
    pos = np.arange(length)[None]
    ra, rb = rewards[prompt[:, None], pos, a].sum(-1), rewards[prompt[:, None], pos, b].sum(-1)
    keep = untied_per_prompt(prompt, ra != rb, pairs_per_prompt)
    better = (ra > rb)[:, None]
    return dict(
        ref=ref.astype(np.float32),
        rewards=rewards.astype(np.float32),
        prompt=prompt[keep],
        chosen=np.where(better, a, b)[keep],
        rejected=np.where(better, b, a)[keep],
        signal=np.arange(length) < signal_positions,
    )


def expected_reward(logits: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """E_pi[r] per prompt [P]."""
    return np.einsum("ptv,ptv->p", np.exp(log_softmax(logits)), rewards)


def position_kl(logits: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """KL(pi_t || ref_t) per prompt and position [P, T]."""
    lp, lq = log_softmax(logits), log_softmax(ref)
    return np.sum(np.exp(lp) * (lp - lq), -1)


def train(
    task: dict[str, np.ndarray],
    method: str,
    *,
    beta: float,
    steps: int,
    lr: float,
    l1: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch gradient descent; returns (policy logits [P, T, V], mask [T, V] (ones for DPO))."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {list(METHODS)}")
    logits, mask = _fit(
        *(jnp.asarray(task[k]) for k in ("ref", "prompt", "chosen", "rejected", "signal")),
        method=method,
        beta=float(beta),
        steps=int(steps),
        lr=float(lr),
        l1=float(l1),
    )
    return np.asarray(logits), np.asarray(mask)


@functools.partial(jax.jit, static_argnames=("method", "beta", "steps", "lr", "l1"))
def _fit(
    ref: jax.Array,
    prompt: jax.Array,
    w: jax.Array,
    lo: jax.Array,
    signal: jax.Array,
    *,
    method: str,
    beta: float,
    steps: int,
    lr: float,
    l1: float,
) -> tuple[jax.Array, jax.Array]:
    pos = jnp.arange(w.shape[1])[None]
    valid = jnp.ones(w.shape, jnp.float32)
    oracle = jnp.broadcast_to(signal[:, None], ref.shape[1:]).astype(jnp.float32)
    dpo, sparsepo = losses.get("dpo"), losses.get("sparsepo")
    lq = jax.nn.log_softmax(ref, -1)

    def at(x, y):  # [P, T, V] or [T, V] at the tokens y [N, T] -> [N, T]
        return x[prompt[:, None], pos, y] if x.ndim == 3 else x[pos, y]

    def objective(params):
        lp = jax.nn.log_softmax(ref + params["table"], -1)
        tw, tl, rw, rl = at(lp, w), at(lp, lo), at(lq, w), at(lq, lo)
        if method == "dpo":
            return jnp.mean(dpo(tw.sum(-1), tl.sum(-1), rw.sum(-1), rl.sum(-1), beta=beta))
        k = jnp.sum(jnp.exp(lq) * (lp - lq), -1)[prompt[:, None], pos]  # [N, T]: k_t, gradient via the policy
        mask = oracle if method == "sparsepo_oracle" else jax.nn.sigmoid(params["mask"])
        return jnp.mean(
            sparsepo(
                tw,
                tl,
                rw,
                rl,
                k,
                k,
                valid,
                valid,
                at(mask, w),
                at(mask, lo),
                beta=beta,
                l1_reward=l1,
                l1_kl=l1,
            )
        )

    tx = optax.sgd(lr)

    def step(_, carry):
        params, opt = carry
        upd, opt = tx.update(jax.grad(objective)(params), opt)
        return optax.apply_updates(params, upd), opt

    params = {"table": jnp.zeros_like(ref), "mask": jnp.zeros(ref.shape[1:], jnp.float32)}
    params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
    fixed = {"dpo": jnp.ones_like(oracle), "sparsepo_oracle": oracle}
    return ref + params["table"], fixed.get(method, jax.nn.sigmoid(params["mask"]))


def run(config: Any, workdir: str) -> dict[str, Any]:
    """DPO, the oracle mask and the learned mask at each L1 weight of ``config.repro.l1_levels``, per seed."""
    p = common.repro_params(config, "repro_sparsepo_tokens")
    seeds = list(p.seeds)
    runs = [
        ("dpo", "dpo", 0.0),
        ("sparsepo_oracle", "sparsepo_oracle", 0.0),
        *((f"sparsepo_learned l1={l1:g}", "sparsepo_learned", float(l1)) for l1 in p.l1_levels),
    ]
    rows: dict[str, dict[int, dict[str, float]]] = {name: {} for name, _, _ in runs}
    for seed in seeds:
        task = make_task(
            seed,
            num_prompts=p.num_prompts,
            length=p.length,
            vocab=p.vocab,
            signal_positions=p.signal_positions,
            pairs_per_prompt=p.pairs_per_prompt,
            ref_scale=p.ref_scale,
        )
        base = expected_reward(task["ref"], task["rewards"])
        sig = task["signal"]
        for name, method, l1 in runs:
            logits, mask = train(task, method, beta=p.beta, steps=p.steps, lr=p.learning_rate, l1=l1)
            pkl = position_kl(logits, task["ref"])
            rows[name][seed] = {
                "reward_gain": float(np.mean(expected_reward(logits, task["rewards"]) - base)),
                "kl_signal": float(np.mean(pkl[:, sig].sum(-1))),
                "kl_filler": float(np.mean(pkl[:, ~sig].sum(-1))),
                "mask_signal": float(mask[sig].mean()),
                "mask_filler": float(mask[~sig].mean()),
            }
    metrics = ("reward_gain", "kl_signal", "kl_filler", "mask_signal", "mask_filler")
    header = [
        "method",
        "E[r] gain",
        "KL on reward positions",
        "KL on filler positions",
        "mask on reward positions",
        "mask on filler",
    ]
    table = [
        [f"`{name}`", *(common.fmt([rows[name][s][k] for s in seeds]) for k in metrics)]
        for name, _, _ in runs
    ]
    markdown = common.markdown_table(header, table)
    common.write_table(workdir, {"rows": rows, "config": p.to_dict()}, markdown)
    return {"rows": rows, "markdown": markdown}
