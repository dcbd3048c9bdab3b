"""Supervised fine-tuning as a registered loss, so SFT runs through the same step as preference training."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from alignjax.losses.registry import register


@register("sft", family="supervised")
def sft(chosen_logps: chex.Array, chosen_lengths: chex.Array) -> jax.Array:
    """Mean token negative log-likelihood of the completion (the SFT stage before DPO).

        L_i = -S_i / max(n_i, 1)

    S_i is the summed completion log-prob of example i and n_i its completion length; the caller
    averages over examples. The length normalisation matches TRL's SFT loss on equal-length batches
    and keeps long and short completions on one scale.

    Args:
      chosen_logps: [B] summed completion log-probs under the policy.
      chosen_lengths: [B] number of completion tokens (clamped to >= 1).

    Returns:
      [B] per-example losses, float32.
    """
    chex.assert_rank([chosen_logps, chosen_lengths], 1)
    chex.assert_equal_shape([chosen_logps, chosen_lengths])
    n = jnp.maximum(jnp.asarray(chosen_lengths, jnp.float32), 1.0)
    return -jnp.asarray(chosen_logps, jnp.float32) / n
