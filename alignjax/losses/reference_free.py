"""Reference-free pairwise losses: no reference model is run (no ``ref_*`` inputs).

Arrays: ``chosen_logps, rejected_logps`` (summed policy log-probs S, [B]), ``chosen_lengths,
rejected_lengths`` (token counts n, [B], clamped to >= 1). Returns per-example losses [B] in float32.
NLL terms are per-token means, -S_w / n_w, per example, or with ``nll_reduction="tokens"`` TRL's
mean over every chosen token of the batch (``common.completion_nll``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignjax.losses.common import (
    as_f32,
    check_probability,
    check_vectors,
    clamp_lengths,
    completion_nll,
    log1mexp,
    smoothed_sigmoid,
)
from alignjax.losses.registry import register

Array = jax.Array


@register("simpo", family="reference_free")
def simpo(chosen_logps: Array, rejected_logps: Array, chosen_lengths: Array, rejected_lengths: Array, *,
          beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0) -> Array:
    """SimPO: length-normalised reward with a target margin, no reference.

    Formula: z = beta (S_w / n_w - S_l / n_l) - gamma;  loss = -(1 - eps) ls(z) - eps ls(-z).
    Paper: "SimPO: Simple Preference Optimization with a Reference-Free Reward" (arXiv 2405.14734).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      chosen_lengths, rejected_lengths: [B] completion token counts n_w, n_l.
      beta: reward scale (default 2.0; the paper's range is 2.0 to 2.5).
      gamma: target margin in units of z (default 0.5; TRL ``simpo_gamma``; the official code's
        ``gamma_beta_ratio`` is gamma / beta).
      label_smoothing: eps in [0, 1] (default 0.0).

    Returns:
      [B] per-example losses, float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> chosen, rejected = jnp.array([-4.0, -6.0]), jnp.array([-8.0, -6.0])
      >>> chosen_lengths, rejected_lengths = jnp.array([4, 3]), jnp.array([4, 3])
      >>> loss = simpo(chosen, rejected, chosen_lengths, rejected_lengths)
      >>> print(np.asarray(loss, float).round(4))
      [0.2014 0.9741]
    """
    check_probability("label_smoothing", label_smoothing)
    check_vectors(chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_lengths=chosen_lengths,
                  rejected_lengths=rejected_lengths)
    sw, sl = as_f32(chosen_logps, rejected_logps)
    z = beta * (sw / clamp_lengths(chosen_lengths) - sl / clamp_lengths(rejected_lengths)) - gamma
    return smoothed_sigmoid(z, label_smoothing)


@register("cpo", family="reference_free")
def cpo(chosen_logps: Array, rejected_logps: Array, chosen_lengths: Array, *, beta: float = 0.1,
        label_smoothing: float = 0.0, nll_weight: float = 1.0, nll_reduction: str = "sequence") -> Array:
    """CPO: reference-free DPO plus behaviour cloning on the chosen response.

    Formula: z = beta (S_w - S_l);  loss = -(1 - eps) ls(z) - eps ls(-z) + nll_weight * (-S_w / n_w).
    Paper: "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine
    Translation" (arXiv 2401.08417).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      chosen_lengths: [B] completion token counts n_w.
      beta: inverse temperature (default 0.1).
      label_smoothing: eps in [0, 1] (default 0.0).
      nll_weight: weight of the chosen NLL term (default 1.0).
      nll_reduction: "sequence" (default, the module docstring) or "tokens" (TRL's CPOTrainer).

    Returns:
      [B] per-example losses, float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> chosen, rejected = jnp.array([-4.0, -6.0]), jnp.array([-8.0, -6.0])
      >>> chosen_lengths, rejected_lengths = jnp.array([4, 3]), jnp.array([4, 3])
      >>> print(np.asarray(cpo(chosen, rejected, chosen_lengths), float).round(4))
      [1.513  2.6931]
    """
    check_probability("label_smoothing", label_smoothing)
    check_vectors(chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_lengths=chosen_lengths)
    sw, sl = as_f32(chosen_logps, rejected_logps)
    nll = completion_nll(sw, chosen_lengths, nll_reduction)
    return smoothed_sigmoid(beta * (sw - sl), label_smoothing) + nll_weight * nll


@register("orpo", family="reference_free")
def orpo(chosen_logps: Array, rejected_logps: Array, chosen_lengths: Array, rejected_lengths: Array, *,
         beta: float = 0.1, nll_reduction: str = "sequence") -> Array:
    """ORPO: NLL on the chosen response plus an odds-ratio preference term.

    Formula: lbar = S / n (mean token log-prob, so p = exp(lbar));  log odds(p) = lbar - log(1 - exp(lbar));
      loss = -lbar_w - beta ls(log odds(p_w) - log odds(p_l)).
    log(1 - exp(.)) is a stable log1mexp; lbar is capped at -1e-6 (p = 1 would make the odds infinite).
    Paper: "ORPO: Monolithic Preference Optimization without Reference Model" (arXiv 2403.07691).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      chosen_lengths, rejected_lengths: [B] completion token counts n_w, n_l.
      beta: weight of the odds-ratio term (default 0.1; the paper's lambda, TRL's ``beta``).
      nll_reduction: "sequence" (default, the module docstring) or "tokens" (TRL's ORPOTrainer) for the
        NLL term; the odds always use S / n.

    Returns:
      [B] per-example losses, float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> chosen, rejected = jnp.array([-4.0, -6.0]), jnp.array([-8.0, -6.0])
      >>> chosen_lengths, rejected_lengths = jnp.array([4, 3]), jnp.array([4, 3])
      >>> print(np.asarray(orpo(chosen, rejected, chosen_lengths, rejected_lengths), float).round(4))
      [1.0238 2.0693]
    """
    check_vectors(chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_lengths=chosen_lengths,
                  rejected_lengths=rejected_lengths)
    sw, sl = as_f32(chosen_logps, rejected_logps)
    lw = sw / clamp_lengths(chosen_lengths)
    ll = sl / clamp_lengths(rejected_lengths)
    cw, cl = jnp.minimum(lw, -1e-6), jnp.minimum(ll, -1e-6)
    log_odds = (cw - log1mexp(cw)) - (cl - log1mexp(cl))
    return completion_nll(sw, chosen_lengths, nll_reduction) - beta * jax.nn.log_sigmoid(log_odds)


@register("alphapo", family="reference_free")
def alphapo(chosen_logps: Array, rejected_logps: Array, chosen_lengths: Array, rejected_lengths: Array, *,
            beta: float = 2.0, gamma: float = 0.5, alpha: float = 0.25) -> Array:
    """AlphaPO: SimPO with an alpha-shaped reward.

    Formula: lbar = S / n;  r = (beta / alpha) (1 - exp(-alpha lbar))   (alpha = 0: r = beta lbar, SimPO);
      loss = -ls(r_w - r_l - gamma). The exponent is capped at 80 so extreme inputs stay finite.
    Paper: "AlphaPO: Reward Shape Matters for LLM Alignment" (arXiv 2501.03884).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      chosen_lengths, rejected_lengths: [B] completion token counts n_w, n_l.
      beta: reward scale (default 2.0).
      gamma: target margin (default 0.5).
      alpha: the reward's shape (default 0.25; 0 is SimPO's linear reward).

    Returns:
      [B] per-example losses, float32.
    """
    check_vectors(chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_lengths=chosen_lengths,
                  rejected_lengths=rejected_lengths)
    sw, sl = as_f32(chosen_logps, rejected_logps)
    lw = sw / clamp_lengths(chosen_lengths)
    ll = sl / clamp_lengths(rejected_lengths)
    if abs(alpha) < 1e-8:
        rw, rl = beta * lw, beta * ll
    else:
        rw = -beta / alpha * jnp.expm1(jnp.minimum(-alpha * lw, 80.0))
        rl = -beta / alpha * jnp.expm1(jnp.minimum(-alpha * ll, 80.0))
    return -jax.nn.log_sigmoid(rw - rl - gamma)
