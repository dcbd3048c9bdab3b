"""Ranking accuracy, its idealised bound, and implicit-reward accuracy.

From "Preference Learning Algorithms Do Not Learn Preference Rankings" (Chen et al., arXiv:2405.19534).
All functions take summed sequence log-probs [B] (or length-normalised ones for the
length-normalised variants) and return scalars or per-pair arrays; they are pure and jit-able.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Rater agreement of exactly 1 makes the idealised bound degenerate (log-odds of infinity);
# the paper replaces it by 0.999.
MAX_AGREEMENT = 0.999
PAPER_BETAS = (0.01, 0.1, 1.0, 5.0, 10.0)


def ranking_accuracy(chosen_logps: jax.Array, rejected_logps: jax.Array) -> jax.Array:
    """R = mean 1[pi(y_w) >= pi(y_l)] (ties count as correct, as in the paper's definition)."""
    return jnp.mean((chosen_logps >= rejected_logps).astype(jnp.float32))


def idealized_ranking_accuracy(
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float,
    agreement: float | jax.Array = 1.0,
) -> jax.Array:
    """Ranking accuracy of the optimal DPO policy pi* (the paper's Theorem 3.1).

    R* = mean 1[(pi_ref(y_w) / pi_ref(y_l)) * (a / (1 - a))^(1/beta) > 1], i.e. in logs
    (R_w - R_l) + log(a / (1 - a)) / beta > 0, with a the rater agreement (scalar or [B]),
    clipped to 0.999 so that unanimous pairs stay finite.
    """
    a = jnp.clip(jnp.asarray(agreement, jnp.float32), 0.5, MAX_AGREEMENT)
    log_odds = jnp.log(a) - jnp.log1p(-a)
    margin = (ref_chosen_logps - ref_rejected_logps).astype(jnp.float32) + log_odds / beta
    return jnp.mean((margin > 0).astype(jnp.float32))


def reward_accuracy(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
) -> jax.Array:
    """TRL's ``rewards/accuracies``: mean 1[r_w > r_l] with r = log pi - log pi_ref (ties are wrong)."""
    margin = chosen_logps - rejected_logps
    if ref_chosen_logps is not None:
        margin = margin - (ref_chosen_logps - ref_rejected_logps)
    return jnp.mean((margin > 0).astype(jnp.float32))


def dpo_ranking_threshold(
    ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, *, beta: float
) -> jax.Array:
    """Per-pair DPO loss below which the pair is ranked correctly (the paper's Theorem 4.1).

    With c = log(pi_ref(y_l) / pi_ref(y_w)), pi(y_w) >= pi(y_l) iff L_DPO <= -log sigmoid(beta c).
    A large threshold means an easy pair (the reference already ranks it); a small one, a pair
    whose loss must be driven far down before the ranking flips.
    """
    c = (ref_rejected_logps - ref_chosen_logps).astype(jnp.float32)
    return -jax.nn.log_sigmoid(beta * c)


def flipped_fraction(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
) -> jax.Array:
    """Share of the pairs the reference misranks that the policy ranks correctly (nan if none)."""
    misranked = ref_chosen_logps < ref_rejected_logps
    fixed = misranked & (chosen_logps >= rejected_logps)
    return jnp.sum(fixed) / jnp.where(jnp.any(misranked), jnp.sum(misranked), jnp.nan)


def ranking_report(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    betas: tuple[float, ...] = PAPER_BETAS,
    agreement: float | jax.Array = 1.0,
) -> dict[str, float]:
    """The evaluation metrics of held-out pairs as a flat dict of floats (stable names)."""
    report = {
        "eval/ranking_accuracy": ranking_accuracy(chosen_logps, rejected_logps),
        "eval/ref_ranking_accuracy": ranking_accuracy(ref_chosen_logps, ref_rejected_logps),
        "eval/reward_accuracy": reward_accuracy(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
        ),
        "eval/flipped_fraction": flipped_fraction(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
        ),
    }
    for beta in betas:
        report[f"eval/idealized_ranking_accuracy/beta={beta:g}"] = idealized_ranking_accuracy(
            ref_chosen_logps, ref_rejected_logps, beta=beta, agreement=agreement
        )
    return {key: float(value) for key, value in report.items()}
