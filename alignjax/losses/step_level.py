"""Step-level preference losses (pairs of reasoning steps from a search tree)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignjax.losses.common import as_f32, check_vectors, pair_scores, smoothed_sigmoid
from alignjax.losses.registry import register

Array = jax.Array


def visit_label_smoothing(chosen_visits: Array, rejected_visits: Array) -> Array:
    """MCTS-DPO's per-pair label smoothing eps = min(N_l / (max(1, N_w) + N_l), 0.5), float32 [B].

    Fewer visits to the chosen step than to the rejected one mean a less certain preference, so more
    smoothing; capped at 0.5 (no preference). N_l = 0 gives eps = 0 (plain DPO).

    Args:
      chosen_visits, rejected_visits: [B] MCTS visit counts N_w, N_l (any numeric dtype).

    Returns:
      [B] float32 eps in [0, 0.5].

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> eps = visit_label_smoothing(jnp.array([9, 1, 4]), jnp.array([0, 3, 1]))
      >>> print(np.asarray(eps, float).round(4))
      [0.  0.5 0.2]
    """
    nw, nl = as_f32(chosen_visits, rejected_visits)
    return jnp.minimum(nl / (jnp.maximum(nw, 1.0) + nl), 0.5)


@register("mcts_dpo", family="step_level", aliases=("step_dpo_visits",))
def mcts_dpo(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
             chosen_visits: Array, rejected_visits: Array, *, beta: float = 0.1) -> Array:
    """MCTS-DPO step-level loss: cDPO with a per-pair label smoothing from MCTS visit counts.

    Formula: z = beta (u_w - u_l), eps = min(N_l / (max(1, N_w) + N_l), 0.5) (constant, no gradient);
      loss = -(1 - eps) ls(z) - eps ls(-z).
    Log-probs are over the step from the first token where the two children differ.
    Paper: "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning" (arXiv 2405.00451).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs of the chosen and rejected steps.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference.
      chosen_visits, rejected_visits: [B] visit counts N_w, N_l (any numeric dtype).
      beta: inverse temperature (default 0.1).

    Returns:
      [B] per-example losses, float32.

    Examples:
      A pair whose rejected step was never visited is a DPO pair; equal visits give eps = 0.5.

      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> chosen, rejected = jnp.array([-5.0, -5.0]), jnp.array([-9.0, -9.0])
      >>> ref_chosen, ref_rejected = jnp.array([-6.0, -6.0]), jnp.array([-8.0, -8.0])
      >>> visits_w, visits_l = jnp.array([4, 2]), jnp.array([0, 2])
      >>> loss = mcts_dpo(chosen, rejected, ref_chosen, ref_rejected, visits_w, visits_l)
      >>> print(np.asarray(loss, float).round(4))
      [0.5981 0.6981]
    """
    check_vectors(chosen_logps=chosen_logps, chosen_visits=chosen_visits, rejected_visits=rejected_visits)
    uw, ul = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = jax.lax.stop_gradient(visit_label_smoothing(chosen_visits, rejected_visits))
    return smoothed_sigmoid(beta * (uw - ul), eps)
