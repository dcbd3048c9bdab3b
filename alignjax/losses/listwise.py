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

    The anchor is the trainer's reference (``config.reference``): ``kind='frozen'`` anchors to the
    initial model, ``kind='ema'`` to an EMA of the policy (``alpha`` < 1), and ``kind='ema'`` with
    ``sync_every=1, alpha=1`` to the previous policy, the policy before each update (then every
    step's loss is KL(q || uniform) and the gradient a trust-region step from the current policy;
    tests/train/test_adpo_anchors.py).

    Args:
      logps: [B, K] summed policy log-probs of the K candidates.
      ref_logps: [B, K] the anchor's log-probs of the same candidates.
      target_probs: [B, K] soft targets q (e.g. :func:`score_targets`).
      candidate_mask: [B, K] 1 = a real candidate, 0 = padding; None = all real.
      tau: temperature (default 10.0; 1 / beta for DPO's beta = 0.1).

    Returns:
      [B] per-example losses, float32.

    Examples:
      With two candidates, a hard target and tau = 1 / beta this is DPO (0.5981 for these log-probs).

      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> logps, ref_logps = jnp.array([[-5.0, -9.0]]), jnp.array([[-6.0, -8.0]])
      >>> print(np.asarray(adpo_listwise(logps, ref_logps, jnp.array([[1.0, 0.0]])), float).round(4))
      [0.5981]
      >>> logps3, ref3 = jnp.array([[-5.0, -9.0, 0.0]]), jnp.array([[-6.0, -8.0, 0.0]])
      >>> q3, mask3 = jnp.array([[1.0, 0.0, 0.0]]), jnp.array([[1, 1, 0]])
      >>> print(np.asarray(adpo_listwise(logps3, ref3, q3, mask3), float).round(4))
      [0.5981]
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

    Args:
      scores: [B, K] candidate scores (rewards, ratings).
      target_temperature: > 0 (default 1.0).

    Returns:
      [B, K] float32 targets, each row summing to 1, no gradient.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> print(np.asarray(score_targets(jnp.array([[1.0, 1.0], [2.0, 0.0]])), float).round(4))
      [[0.5    0.5   ]
       [0.8808 0.1192]]
    """
    chex.assert_rank(scores, 2)
    if target_temperature <= 0:
        raise ValueError(f"target_temperature must be > 0; got {target_temperature!r}")
    (s,) = as_f32(jax.lax.stop_gradient(scores))
    z = (s - jnp.mean(s, axis=-1, keepdims=True)) / jnp.maximum(jnp.std(s, axis=-1, keepdims=True), 1e-6)
    return jax.nn.softmax(z / target_temperature, axis=-1)
