"""Preference metrics with TRL's names and definitions: a flat dict of scalars."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignjax.losses.common import as_f32, check_vectors

Array = jax.Array


def preference_metrics(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array | None = None,
                       ref_rejected_logps: Array | None = None, *, beta: float = 0.1) -> dict[str, Array]:
    """TRL's DPO metrics, batch means (float32 scalars, no gradient).

    rewards/chosen = mean(beta (S_w - R_w)), rewards/rejected = mean(beta (S_l - R_l)),
    rewards/accuracies = mean(1[r_w > r_l]) (ties count as wrong, as TRL), rewards/margins = mean(r_w - r_l),
    logps/chosen = mean(S_w), logps/rejected = mean(S_l).
    Reference-free (``ref_* = None``): R = 0, so rewards are beta S (TRL's ``reference_free``).
    Under data parallelism these are means over the global batch when the inputs are global arrays.

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the reference's, or both None.
      beta: the implicit reward's scale (default 0.1).

    Returns:
      A dict of float32 scalars under TRL's names.

    Examples:
      >>> import jax.numpy as jnp
      >>> chosen, rejected = jnp.array([-5.0, -7.0]), jnp.array([-9.0, -6.0])
      >>> ref_chosen, ref_rejected = jnp.array([-6.0, -7.0]), jnp.array([-8.0, -6.0])
      >>> metrics = preference_metrics(chosen, rejected, ref_chosen, ref_rejected)
      >>> {k: round(float(v), 4) for k, v in metrics.items()}  # doctest: +NORMALIZE_WHITESPACE
      {'rewards/chosen': 0.05, 'rewards/rejected': -0.05, 'rewards/accuracies': 0.5,
       'rewards/margins': 0.1, 'logps/chosen': -6.0, 'logps/rejected': -7.5}
    """
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("preference_metrics: pass both ref_chosen_logps and ref_rejected_logps, or neither")
    check_vectors(chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
                  ref_rejected_logps=ref_rejected_logps)
    sw, sl = as_f32(*jax.lax.stop_gradient((chosen_logps, rejected_logps)))
    if ref_chosen_logps is None:
        rw, rl = jnp.zeros_like(sw), jnp.zeros_like(sl)
    else:
        rw, rl = as_f32(*jax.lax.stop_gradient((ref_chosen_logps, ref_rejected_logps)))
    reward_w, reward_l = beta * (sw - rw), beta * (sl - rl)
    return {
        "rewards/chosen": jnp.mean(reward_w),
        "rewards/rejected": jnp.mean(reward_l),
        "rewards/accuracies": jnp.mean((reward_w > reward_l).astype(jnp.float32)),
        "rewards/margins": jnp.mean(reward_w - reward_l),
        "logps/chosen": jnp.mean(sw),
        "logps/rejected": jnp.mean(sl),
    }
