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
    Shapes: four [B] log-probs, ``chosen_visits, rejected_visits`` [B] (visit counts N_w, N_l, any numeric
    dtype) -> [B].
    Hyperparameters: beta = 0.1.
    """
    check_vectors(chosen_logps=chosen_logps, chosen_visits=chosen_visits, rejected_visits=rejected_visits)
    uw, ul = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = jax.lax.stop_gradient(visit_label_smoothing(chosen_visits, rejected_visits))
    return smoothed_sigmoid(beta * (uw - ul), eps)
