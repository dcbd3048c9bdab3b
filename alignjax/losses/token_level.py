"""Token-level preference objectives: losses over per-token log-ratios with token weights.

Array conventions (B pairs, T completion positions, right- or left-padded):

- ``chosen_token_logps`` / ``rejected_token_logps`` [B, T]: per-token log-probs under the policy;
  ``ref_chosen_token_logps`` / ``ref_rejected_token_logps`` the same under the reference.
- ``chosen_mask`` / ``rejected_mask`` [B, T]: 1 on completion tokens, 0 on prompt/padding.
  Values at masked positions never matter (they are selected away, not multiplied, so even NaN or
  inf garbage there is harmless).
- ``chosen_token_kl`` / ``rejected_token_kl`` [B, T]: per-token divergence terms computed by the
  trainer from the full next-token distributions (the loss never sees the vocabulary).

Returns per-example losses [B] (fp32); the caller reduces.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from alignjax.losses.common import at_least_f32
from alignjax.losses.registry import register


def _masked_sum(values: jax.Array, weights: jax.Array, mask: jax.Array) -> jax.Array:
    """sum_t mask_t * weights_t * values_t, with masked positions selected away (NaN-safe)."""
    valid = jnp.asarray(mask).astype(bool)
    # Select both factors (not multiply by the mask): 0 * NaN garbage would poison values and grads.
    return jnp.sum(jnp.where(valid, weights, 0.0) * jnp.where(valid, values, 0.0), axis=-1)


@register("sparsepo", family="token_level")
def sparsepo(
    chosen_token_logps: chex.Array,
    rejected_token_logps: chex.Array,
    ref_chosen_token_logps: chex.Array,
    ref_rejected_token_logps: chex.Array,
    chosen_token_kl: chex.Array,
    rejected_token_kl: chex.Array,
    chosen_mask: chex.Array,
    rejected_mask: chex.Array,
    chosen_reward_mask: chex.Array,
    rejected_reward_mask: chex.Array,
    chosen_kl_mask: chex.Array | None = None,
    rejected_kl_mask: chex.Array | None = None,
    *,
    beta: float = 0.1,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
) -> jax.Array:
    """SparsePO: DPO with token masks on the reward and on the KL term.

    "SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks"
    (Christopoulou et al., arXiv:2410.05102). With Delta_t = log pi(y_t|.) - log pi_ref(y_t|.),
    reward masks m^u, KL masks m^d (all in [0, 1]) and the per-token KL term k_t:

        u = sum_t m^u_{w,t} Delta_t(y_w) - sum_t m^u_{l,t} Delta_t(y_l)
        d = sum_t m^d_{w,t} k_{w,t}      - sum_t m^d_{l,t} k_{l,t}
        L = -log sigmoid(beta (u - d)) + lambda_u (|m^u_w|_1 + |m^u_l|_1) + lambda_d (|m^d_w|_1 + |m^d_l|_1)

    where k_t = sum_v pi_ref(v|.) (log pi(v|.) - log pi_ref(v|.)) is supplied by the trainer. As in the
    official code (huawei-noah/HEBO SparsePO/src/trainers/sparse_trainer.py), the reward and KL masks
    have separate L1 weights and both norms are added; with a shared ("common") mask both weights
    are halved, so the one mask costs (lambda_u + lambda_d) / 2 per unit of L1 norm. Sums and norms
    run over valid (``*_mask``) tokens only.

    Args:
      chosen_token_logps, rejected_token_logps: [B, T] policy token log-probs.
      ref_chosen_token_logps, ref_rejected_token_logps: [B, T] reference token log-probs.
      chosen_token_kl, rejected_token_kl: [B, T] per-token k_t.
      chosen_mask, rejected_mask: [B, T] padding masks (1 = completion token).
      chosen_reward_mask, rejected_reward_mask: [B, T] reward masks m^u in [0, 1] (from reference
        activations normalised to [0, 1], or a learned head: gradients flow into them).
      chosen_kl_mask, rejected_kl_mask: optional [B, T] KL masks m^d; None = shared with the reward
        masks (the paper's "common mask" setting).
      beta: inverse temperature (paper default 0.1).
      l1_reward, l1_kl: lambda_u and lambda_d, the L1 weights of the reward and KL masks (official
        ``l1_norm_param_u`` / ``l1_norm_param_d``; default 0.0 as there, 0.001 each in the paper's HH
        setting; fixed masks need none, learned masks use them to encourage sparsity).

    Returns:
      [B] per-example losses.

    Examples:
      Two pairs of three-token completions; the rejected rows end in one padding token. With all-ones
      masks and no KL term SparsePO is DPO on the summed token log-ratios.

      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> chosen = jnp.array([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
      >>> rejected = jnp.array([[-2.0, -2.0, 0.0], [-2.0, -2.0, 0.0]])
      >>> ref = jnp.full((2, 3), -1.5)
      >>> mask_w, mask_l = jnp.ones((2, 3)), jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
      >>> no_kl = jnp.zeros((2, 3))
      >>> loss = sparsepo(chosen, rejected, ref, ref, no_kl, no_kl, mask_w, mask_l, mask_w, mask_l, beta=1.0)
      >>> print(np.asarray(loss, float).round(4))
      [0.0789 0.9741]
    """
    arrays = [
        chosen_token_logps,
        rejected_token_logps,
        ref_chosen_token_logps,
        ref_rejected_token_logps,
        chosen_token_kl,
        rejected_token_kl,
        chosen_mask,
        rejected_mask,
        chosen_reward_mask,
        rejected_reward_mask,
    ]
    chex.assert_rank(arrays, 2)
    chex.assert_equal_shape_prefix(arrays, 1)
    chex.assert_equal_shape([chosen_token_logps, ref_chosen_token_logps, chosen_token_kl, chosen_mask])
    chex.assert_equal_shape(
        [rejected_token_logps, ref_rejected_token_logps, rejected_token_kl, rejected_mask]
    )
    chex.assert_equal_shape([chosen_reward_mask, chosen_mask])
    chex.assert_equal_shape([rejected_reward_mask, rejected_mask])
    if (chosen_kl_mask is None) != (rejected_kl_mask is None):
        raise ValueError("sparsepo: give both chosen_kl_mask and rejected_kl_mask, or neither (shared masks)")
    independent = chosen_kl_mask is not None
    if independent:
        chex.assert_equal_shape([chosen_kl_mask, chosen_mask])
        chex.assert_equal_shape([rejected_kl_mask, rejected_mask])
    else:
        chosen_kl_mask, rejected_kl_mask = chosen_reward_mask, rejected_reward_mask

    delta_w = at_least_f32(chosen_token_logps) - at_least_f32(ref_chosen_token_logps)
    delta_l = at_least_f32(rejected_token_logps) - at_least_f32(ref_rejected_token_logps)
    mu_w, mu_l = at_least_f32(chosen_reward_mask), at_least_f32(rejected_reward_mask)
    md_w, md_l = at_least_f32(chosen_kl_mask), at_least_f32(rejected_kl_mask)

    u = _masked_sum(delta_w, mu_w, chosen_mask) - _masked_sum(delta_l, mu_l, rejected_mask)
    d = _masked_sum(at_least_f32(chosen_token_kl), md_w, chosen_mask) - _masked_sum(
        at_least_f32(rejected_token_kl), md_l, rejected_mask
    )
    loss = -jax.nn.log_sigmoid(beta * (u - d))

    ones_w, ones_l = jnp.ones_like(mu_w), jnp.ones_like(mu_l)
    l1_u = _masked_sum(jnp.abs(mu_w), ones_w, chosen_mask) + _masked_sum(jnp.abs(mu_l), ones_l, rejected_mask)
    l1_d = _masked_sum(jnp.abs(md_w), ones_w, chosen_mask) + _masked_sum(jnp.abs(md_l), ones_l, rejected_mask)
    # A shared mask enters both norms; the official trainer halves both weights to make up for it.
    scale = 1.0 if independent else 0.5
    return loss + scale * (l1_reward * l1_u + l1_kl * l1_d)


@register("sparsepo_learned", family="token_level")
def sparsepo_learned(
    chosen_token_logps: chex.Array,
    rejected_token_logps: chex.Array,
    ref_chosen_token_logps: chex.Array,
    ref_rejected_token_logps: chex.Array,
    chosen_token_kl: chex.Array,
    rejected_token_kl: chex.Array,
    chosen_mask: chex.Array,
    rejected_mask: chex.Array,
    chosen_learned_reward_mask: chex.Array,
    rejected_learned_reward_mask: chex.Array,
    chosen_learned_kl_mask: chex.Array,
    rejected_learned_kl_mask: chex.Array,
    *,
    beta: float = 0.1,
    l1_reward: float = 0.001,
    l1_kl: float = 0.001,
    shared_mask: bool = False,
) -> jax.Array:
    """SparsePO with learned masks: :func:`sparsepo` whose reward and KL masks are
    ``m = sigmoid(w . h + b)`` of the reference model's hidden state ``h`` at each token, ``w, b``
    trained with the policy (the trainer's aux heads ``sparsepo_reward_mask`` and
    ``sparsepo_kl_mask``; the reference's states carry no gradient). The paper's "independent"
    masks by default; ``shared_mask=True`` uses the reward mask for both terms (its "common" mask).

    Hyperparameters: beta = 0.1; l1_reward = l1_kl = 0.001 (the paper's HH setting: learned masks
    need the L1 terms for sparsity); shared_mask = False.

    Returns:
      [B] per-example losses.
    """
    kl_masks = (None, None) if shared_mask else (chosen_learned_kl_mask, rejected_learned_kl_mask)
    return sparsepo(
        chosen_token_logps, rejected_token_logps, ref_chosen_token_logps, ref_rejected_token_logps,
        chosen_token_kl, rejected_token_kl, chosen_mask, rejected_mask,
        chosen_learned_reward_mask, rejected_learned_reward_mask, *kl_masks,
        beta=beta, l1_reward=l1_reward, l1_kl=l1_kl,
    )
