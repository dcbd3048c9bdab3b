"""Listwise preference losses over K candidates per prompt.

Arrays: ``logps`` [B, K] (policy summed log-probs of K candidates), ``ref_logps`` [B, K] (anchor log-probs,
in the reference slot: the trainer fills it with its configured reference: frozen, teacher, old policy or
EMA), ``target_probs`` [B, K] (q, a distribution over the candidates), ``candidate_mask`` [B, K] (1 = real
candidate, 0 = padding; None = all real). Returns per-example losses [B] in float32.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from alignjax.losses.common import as_f32
from alignjax.losses.registry import register

Array = jax.Array


@register("adpo_listwise", family="listwise", reward_scale=lambda h: 1.0 / h["tau"])
def adpo_listwise(logps: Array, ref_logps: Array, target_probs: Array, candidate_mask: Array | None = None, *,
                  tau: float = 10.0) -> Array:
    """Anchored DPO, listwise: KL from the soft targets to the anchored softmax over candidates.

    Formula: p = softmax_k((s_k - s_anc,k) / tau) over the valid candidates;
      loss = KL(q || p) = sum_k q_k (log q_k - log p_k)   (terms with q_k = 0 contribute 0).
    K = 2, q = (1, 0), anchor = reference, tau = 1 / beta recovers DPO.
    Masked candidates are excluded from the softmax and must carry q = 0 (their q is ignored);
    q is renormalised over the valid candidates, so a masked call equals the call on the sliced arrays.
    Paper: ADPO, "Anchored Direct Preference Optimization" (objectives.md; targets e.g. softmax of
    standardised rewards / temperature).
    Shapes: ``logps, ref_logps, target_probs`` [B, K]; ``candidate_mask`` [B, K] or None -> [B].
    Hyperparameters: tau = 10.0 (temperature; 1 / beta for DPO's beta = 0.1).
    """
    chex.assert_rank([logps, ref_logps, target_probs], 2)
    chex.assert_equal_shape([logps, ref_logps, target_probs])
    s, a, q = as_f32(logps, ref_logps, target_probs)
    if candidate_mask is None:
        valid = jnp.ones_like(s, dtype=bool)
    else:
        chex.assert_equal_shape([logps, candidate_mask])
        valid = jnp.asarray(candidate_mask).astype(bool)
    x = jnp.where(valid, (s - a) / tau, -jnp.inf)
    log_p = jax.nn.log_softmax(x, axis=-1)
    q = jnp.where(valid, q, 0.0)
    q = q / jnp.maximum(jnp.sum(q, axis=-1, keepdims=True), 1e-30)
    positive = q > 0
    # where() on both sides keeps 0 * (-inf) and log(0) out of the value and the gradient.
    safe_q = jnp.where(positive, q, 1.0)
    safe_log_p = jnp.where(valid, log_p, 0.0)
    return jnp.sum(jnp.where(positive, q * (jnp.log(safe_q) - safe_log_p), 0.0), axis=-1)


def score_targets(scores: Array, *, target_temperature: float = 1.0) -> Array:
    """ADPO's soft targets from candidate scores: q = softmax(standardise(scores) / temperature), [B, K].

    Scores are standardised over each example's K candidates (mean 0, standard deviation 1, floored
    at 1e-6 so that equal scores give uniform targets), so the temperature means the same for any
    score scale. A temperature near 0 approaches the hard target (all mass on the best candidate).
    Paper: ADPO, "Anchored Direct Preference Optimization" (objectives.md: soft targets as a softmax of
    standardised rewards over a temperature).
    Shapes: ``scores`` [B, K] -> [B, K] float32, no gradient.
    """
    chex.assert_rank(scores, 2)
    if target_temperature <= 0:
        raise ValueError(f"target_temperature must be > 0; got {target_temperature!r}")
    (s,) = as_f32(jax.lax.stop_gradient(scores))
    z = (s - jnp.mean(s, axis=-1, keepdims=True)) / jnp.maximum(jnp.std(s, axis=-1, keepdims=True), 1e-6)
    return jax.nn.softmax(z / target_temperature, axis=-1)
