"""Reproduction: WPO vs DPO when most preference pairs are off-policy.

Claim ("WPO: Enhancing RLHF with Weighted Preference Optimization", Zhou et al., arXiv 2406.11827):
off-policy preference data (responses sampled from other models) leaves a gap between the data and the
policy; weighting each pair by the policy's own (length-normalised, aligned) probability of its two
responses, w = min(1, exp(a_w + a_l)), a = mean_t(log p_t - log sum_v p_v^2), simulates on-policy
learning and improves over DPO trained on the same off-policy pairs.

Task (synthetic; the policy is a per-prompt linear family over token features, so pairs compete for
the same few parameters, as they do in a network): P prompts, responses of T tokens over V tokens.
The reference's per-position logits are random (``ref_scale`` N(0, 1)); the policy's logits are
ref[p, t, v] + phi(v) . theta_p, with fixed token features phi [V, d] and d < V trainable numbers per
prompt (theta = 0 at the start: policy = reference). A response's true reward is r(y) = sum_t R[p, y_t]:
``reward="misspecified"``: R random, independent of phi (what the features can express differs between
regions of the token space, so preferences among rare tokens do not transfer to the common ones);
``reward="linear"``: R = phi w_p (every pair carries the same direction: a control where off-policy
pairs are fully informative). Pairs per prompt: a share ``off_policy`` of both responses sampled from a
behaviour model softmax(-ref) (it favours what the reference rarely says), the rest sampled from the
reference (on-policy at the start); the chosen one has the higher true reward. Losses: the library's
``dpo`` and ``wpo`` (weights from the current policy each step, library ``log_sum_sq_probs`` /
``wpo_aligned_logps``), and ``dpo_on_policy_only`` (DPO on the on-policy pairs alone: what a perfect
filter would give). Full-batch Adam. Metric: the gain in expected true reward E_pi[r] - E_ref[r]
(exact, the policy factorises over positions) and KL(pi || ref) per response.

    python -m alignjax.main --config=experiments/repro_wpo_offpolicy.py --workdir=workdirs/repro_wpo
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

METHODS = ("dpo", "wpo", "dpo_on_policy_only")
REWARDS = ("misspecified", "linear")


def make_task(
    seed: int,
    *,
    num_prompts: int,
    length: int,
    vocab: int,
    features: int,
    pairs_per_prompt: int,
    off_policy: float,
    ref_scale: float,
    reward: str,
) -> dict[str, np.ndarray]:
    """Reference logits [P, T, V], features [V, d], token rewards [P, V], pairs [N, T] with their prompt
    and an ``off`` flag [N] (sampled from softmax(-ref) rather than the reference)."""
    if reward not in REWARDS:
        raise ValueError(f"config.repro.rewards: {reward!r} is not one of {list(REWARDS)}")
    rng = np.random.default_rng(seed)
    ref = ref_scale * rng.normal(size=(num_prompts, length, vocab))
    phi = rng.normal(size=(vocab, features))
    if reward == "linear":
        rewards = phi @ rng.normal(size=(features, num_prompts)) / np.sqrt(features)
        rewards = rewards.T
    else:
        rewards = rng.normal(size=(num_prompts, vocab))
    prompt = np.repeat(np.arange(num_prompts), 2 * pairs_per_prompt)  # ties dropped below
    off = rng.random(prompt.size) < off_policy

    def sample(logits: np.ndarray) -> np.ndarray:  # [N, T, V] -> [N, T]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        u = rng.random(p.shape[:-1] + (1,))
        return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)

    behaviour = np.where(off[:, None, None], -ref[prompt], ref[prompt])
    a, b = sample(behaviour), sample(behaviour)
    ra = rewards[prompt[:, None], a].sum(-1)
    rb = rewards[prompt[:, None], b].sum(-1)
    keep = untied_per_prompt(prompt, ra != rb, pairs_per_prompt)
    win = np.where((ra > rb)[:, None], a, b)[keep]
    lose = np.where((ra > rb)[:, None], b, a)[keep]
    return dict(
        ref=ref.astype(np.float32),
        phi=phi.astype(np.float32),
        rewards=rewards.astype(np.float32),
        prompt=prompt[keep],
        chosen=win,
        rejected=lose,
        off=off[keep],
    )


def untied_per_prompt(prompt: np.ndarray, untied: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first ``n`` untied pairs of every prompt (a fixed pair count keeps the shapes, and
    so the compiled training program, the same across tasks)."""
    out = []
    for p in np.unique(prompt):
        idx = np.nonzero((prompt == p) & untied)[0][:n]
        if idx.size < n:
            raise ValueError(f"prompt {p}: only {idx.size} untied pairs of {n}; raise the sample size")
        out.append(idx)
    return np.concatenate(out)


def policy_logits(theta: jax.Array, ref: jax.Array, phi: jax.Array) -> jax.Array:
    """[P, T, V]: ref[p, t, v] + phi(v) . theta_p."""
    return ref + jnp.einsum("vd,pd->pv", phi, theta)[:, None, :]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """NumPy log-softmax over the last axis (float64)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def expected_reward(logits: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """E_pi[r] per prompt [P] for r(y) = sum_t R[p, y_t] and a policy that factorises over positions."""
    return np.einsum("ptv,pv->p", np.exp(log_softmax(logits)), rewards)


def kl(logits: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """KL(pi || ref) per prompt [P], summed over positions."""
    lp, lq = log_softmax(logits), log_softmax(ref)
    return np.sum(np.exp(lp) * (lp - lq), axis=(-1, -2))


def train(task: dict[str, np.ndarray], method: str, *, beta: float, steps: int, lr: float) -> np.ndarray:
    """Full-batch Adam on theta [P, d]; returns the final policy logits [P, T, V]."""
    sel = ~task["off"] if method == "dpo_on_policy_only" else np.ones_like(task["off"])
    arrays = (task["ref"], task["phi"], task["prompt"][sel], task["chosen"][sel], task["rejected"][sel])
    return np.asarray(
        _fit(*map(jnp.asarray, arrays), wpo=method == "wpo", beta=float(beta), steps=int(steps), lr=float(lr))
    )


@functools.partial(jax.jit, static_argnames=("wpo", "beta", "steps", "lr"))
def _fit(
    ref: jax.Array,
    phi: jax.Array,
    prompt: jax.Array,
    w: jax.Array,
    lo: jax.Array,
    *,
    wpo: bool,
    beta: float,
    steps: int,
    lr: float,
) -> jax.Array:
    pos = jnp.arange(w.shape[1])[None]
    mask = jnp.ones(w.shape, jnp.float32)
    loss_fn = losses.get("wpo" if wpo else "dpo")

    def token_logps(logits, y):  # [P, T, V], [N, T] -> [N, T]
        return jax.nn.log_softmax(logits, -1)[prompt[:, None], pos, y]

    ref_w, ref_l = token_logps(ref, w).sum(-1), token_logps(ref, lo).sum(-1)

    def objective(theta):
        logits = policy_logits(theta, ref, phi)
        tw, tl = token_logps(logits, w), token_logps(logits, lo)
        args = (tw.sum(-1), tl.sum(-1), ref_w, ref_l)
        if wpo:
            lss = modifiers.log_sum_sq_probs(jax.lax.stop_gradient(logits))[prompt]  # [N, T]
            aw = modifiers.wpo_aligned_logps(jax.lax.stop_gradient(tw), lss, mask)
            al = modifiers.wpo_aligned_logps(jax.lax.stop_gradient(tl), lss, mask)
            return jnp.mean(loss_fn(*args, aw, al, beta=beta))
        return jnp.mean(loss_fn(*args, beta=beta))

    tx = optax.adam(lr)

    def step(_, carry):
        theta, opt = carry
        upd, opt = tx.update(jax.grad(objective)(theta), opt)
        return optax.apply_updates(theta, upd), opt

    theta = jnp.zeros((ref.shape[0], phi.shape[1]), jnp.float32)
    theta, _ = jax.lax.fori_loop(0, steps, step, (theta, tx.init(theta)))
    return policy_logits(theta, ref, phi)


def pair_weights(task: dict[str, np.ndarray]) -> np.ndarray:
    """WPO's weight of every pair under the reference (the policy at step 0), [N]."""
    arrays = (task["ref"], task["prompt"], task["chosen"], task["rejected"])
    return np.asarray(_pair_weights(*map(jnp.asarray, arrays)))


@jax.jit
def _pair_weights(ref: jax.Array, prompt: jax.Array, w: jax.Array, lo: jax.Array) -> jax.Array:
    pos = jnp.arange(w.shape[1])[None]
    lp = jax.nn.log_softmax(ref, -1)
    lss = modifiers.log_sum_sq_probs(ref)[prompt]
    mask = jnp.ones(w.shape, jnp.float32)
    a = [modifiers.wpo_aligned_logps(lp[prompt[:, None], pos, y], lss, mask) for y in (w, lo)]
    return jnp.minimum(1.0, jnp.exp(a[0] + a[1]))


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Every (reward, off-policy share, beta, method, seed) cell; the main table at ``config.repro.beta``
    and a beta sweep (``config.repro.sweep_betas``) on the first reward kind, to compare at matched KL."""
    p = common.repro_params(config, "repro_wpo_offpolicy")
    bad = [r for r in p.rewards if r not in REWARDS]
    if bad:
        raise ValueError(f"config.repro.rewards: {bad} not in {list(REWARDS)}")
    seeds = list(p.seeds)
    rows: dict[str, dict[int, dict[str, float]]] = {}  # "reward/off/beta/method" -> seed -> metrics
    weights: dict[str, dict[int, dict[str, float]]] = {}
    betas = sorted({float(p.beta), *(float(b) for b in p.sweep_betas)})
    for reward in p.rewards:
        for off in p.off_policy_levels:
            for seed in seeds:
                task = make_task(
                    seed,
                    num_prompts=p.num_prompts,
                    length=p.length,
                    vocab=p.vocab,
                    features=p.features,
                    pairs_per_prompt=p.pairs_per_prompt,
                    off_policy=off,
                    ref_scale=p.ref_scale,
                    reward=reward,
                )
                on = ~task["off"]
                if reward == p.rewards[0]:
                    w0 = pair_weights(task)
                    weights.setdefault(f"{off:.1f}", {})[seed] = {
                        "on_policy": float(w0[on].mean()) if on.any() else float("nan"),
                        "off_policy": float(w0[~on].mean()) if (~on).any() else float("nan"),
                    }
                base = expected_reward(task["ref"], task["rewards"])
                for beta in betas:
                    if beta != p.beta and (reward != p.rewards[0] or off == 0):
                        continue
                    for m in METHODS:
                        if m == "dpo_on_policy_only" and (not on.any() or beta != p.beta):
                            continue
                        logits = train(task, m, beta=beta, steps=p.steps, lr=p.learning_rate)
                        rows.setdefault(f"{reward}/{off:.1f}/{beta:g}/{m}", {})[seed] = {
                            "reward_gain": float(np.mean(expected_reward(logits, task["rewards"]) - base)),
                            "kl": float(np.mean(kl(logits, task["ref"]))),
                        }

    def cell(key: str, metric: str) -> str:
        return common.fmt([rows[key][s][metric] for s in seeds]) if key in rows else "n/a"

    header = [
        "reward",
        "off-policy pairs",
        *(f"{m}: E[r] gain" for m in METHODS),
        *(f"{m}: KL" for m in METHODS),
    ]
    table = [
        [
            reward,
            f"{off:.0%}",
            *(cell(f"{reward}/{off:.1f}/{p.beta:g}/{m}", "reward_gain") for m in METHODS),
            *(cell(f"{reward}/{off:.1f}/{p.beta:g}/{m}", "kl") for m in METHODS),
        ]
        for reward in p.rewards
        for off in p.off_policy_levels
    ]
    markdown = common.markdown_table(header, table)
    sweep = [
        [
            f"{off:.0%}",
            f"{beta:g}",
            *(
                f"{cell(k, 'reward_gain')} (KL {cell(k, 'kl')})"
                for k in (f"{p.rewards[0]}/{off:.1f}/{beta:g}/{m}" for m in METHODS[:2])
            ),
        ]
        for off in p.off_policy_levels
        if off > 0
        for beta in betas
    ]
    markdown += "\n\n" + common.markdown_table(
        ["off-policy pairs", "beta", f"dpo: E[r] gain ({p.rewards[0]})", "wpo: E[r] gain"], sweep
    )
    wrow = [
        [
            f"{float(k):.0%}",
            common.fmt([v[s]["on_policy"] for s in seeds]),
            common.fmt([v[s]["off_policy"] for s in seeds]),
        ]
        for k, v in weights.items()
    ]
    markdown += "\n\n" + common.markdown_table(
        ["off-policy pairs", "WPO weight at step 0: on-policy pairs", "off-policy pairs"], wrow
    )
    common.write_table(workdir, {"rows": rows, "weights": weights, "config": p.to_dict()}, markdown)
    return {"rows": rows, "weights": weights, "markdown": markdown}
