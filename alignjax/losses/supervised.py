"""Supervised fine-tuning as a registered loss, so SFT runs through the same step as preference training."""

from __future__ import annotations

import chex
import jax

from alignjax.losses.common import completion_nll
from alignjax.losses.registry import register


@register("sft", family="supervised")
def sft(chosen_logps: chex.Array, chosen_lengths: chex.Array, *, reduction: str = "sequence") -> jax.Array:
    """Mean token negative log-likelihood of the completion (the SFT stage before DPO).

        reduction="sequence":  L_i = -S_i / max(n_i, 1)          (each example's own token mean)
        reduction="tokens":    L_i = -S_i / max(mean_j n_j, 1)   (mean_i L_i = -sum S / sum n)

    S_i is the summed completion log-prob of example i and n_i its completion length; the caller
    averages over examples. "tokens" is TRL's reduction (DPOTrainer's ``sft`` loss_type, used in
    MPO's ``sigmoid + bco_pair + sft`` mix, and SFTTrainer): the mean over every completion token of
    the batch, which weights long completions more; the two agree on equal-length batches.
    "sequence" keeps long and short completions on one scale.

    Args:
      chosen_logps: [B] summed completion log-probs under the policy.
      chosen_lengths: [B] number of completion tokens (clamped to >= 1).

      reduction: "sequence" (default) or "tokens" (TRL's), see above.

    Returns:
      [B] per-example losses, float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> logps, lengths = jnp.array([-2.0, -6.0]), jnp.array([1, 3])
      >>> print(np.asarray(sft(logps, lengths), float).round(4))
      [2. 2.]
      >>> print(np.asarray(sft(logps, lengths, reduction="tokens"), float).round(4))
      [1. 3.]
    """
    chex.assert_rank([chosen_logps, chosen_lengths], 1)
    chex.assert_equal_shape([chosen_logps, chosen_lengths])
    return completion_nll(chosen_logps, chosen_lengths, reduction)
