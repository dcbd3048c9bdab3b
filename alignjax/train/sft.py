"""The SFT objective as a registered loss, so SFT runs through the same step as DPO.

    L_i = -S_i / max(n_i, 1)   (mean token NLL of completion i; the step averages over examples)

Registered as ``sft`` unless ``alignjax.losses`` already provides a loss of that name.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

import alignjax.losses as losses


def sft(chosen_logps: chex.Array, chosen_lengths: chex.Array) -> jax.Array:
    """Per-example mean token negative log-likelihood of the completion: ``-S / max(n, 1)``, [B] fp32.

    Args:
      chosen_logps: [B] summed completion log-probs under the policy.
      chosen_lengths: [B] number of completion tokens.
    """
    chex.assert_rank([chosen_logps, chosen_lengths], 1)
    chex.assert_equal_shape([chosen_logps, chosen_lengths])
    n = jnp.maximum(jnp.asarray(chosen_lengths, jnp.float32), 1.0)
    return -jnp.asarray(chosen_logps, jnp.float32) / n


if "sft" not in losses.names():
    losses.register("sft", family="sft")(sft)
