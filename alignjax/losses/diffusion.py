"""Preference objectives for diffusion models, and the DDIM pieces they need.

Array conventions (B image pairs):

- ``chosen_errors`` / ``rejected_errors`` [B]: per-example denoising errors
  e(x) = mean ||eps - eps_theta(x_t, t, c)||^2 of the trained model (:func:`denoising_error`),
  with the *same* t and noise for the winner and the loser;
  ``ref_chosen_errors`` / ``ref_rejected_errors`` the same under the frozen reference.
- Latents/noise ``x``, ``eps`` [B, ...] (any trailing shape, e.g. [B, H, W, C]).
- ``alphas_cumprod`` [N]: the noise schedule's cumulative products; timesteps are ints in [0, N)
  (scalars or [B]); -1 means "before step 0" (alpha_bar = 1, i.e. the clean sample).

Losses return per-example values [B] (fp32); the caller reduces.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from alignjax.losses.common import at_least_f32
from alignjax.losses.registry import register


def denoising_error(eps: chex.Array, eps_pred: chex.Array) -> jax.Array:
    """Per-example denoising error: the mean over non-batch axes of (eps - eps_pred)^2.

    Args:
      eps: [B, ...] the noise added.
      eps_pred: [B, ...] the model's prediction of it.

    Returns:
      [B] float32 (or float64 for float64 inputs).

    Examples:
      >>> import jax.numpy as jnp
      >>> denoising_error(jnp.zeros((2, 2, 2)), jnp.ones((2, 2, 2))).tolist()
      [1.0, 1.0]
    """
    chex.assert_equal_shape([eps, eps_pred])
    chex.assert_rank(eps, {2, 3, 4, 5})
    diff = at_least_f32(eps_pred) - at_least_f32(eps)
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


@register("diffusion_dpo", family="diffusion", aliases=("dcpo",))
def diffusion_dpo(
    chosen_errors: chex.Array,
    rejected_errors: chex.Array,
    ref_chosen_errors: chex.Array,
    ref_rejected_errors: chex.Array,
    *,
    beta: float = 5000.0,
) -> jax.Array:
    """Diffusion-DPO over denoising errors.

    "Diffusion Model Alignment Using Direct Preference Optimization" (Wallace et al.,
    arXiv:2311.12908):

        L = -log sigmoid(-(beta / 2) [(e_theta - e_ref)(x_w) - (e_theta - e_ref)(x_l)])

    A lower error than the reference on the winner (and a higher one on the loser) lowers the loss.
    Model == reference gives log 2.

    DCPO ("Dual Caption Preference Optimization for Diffusion Models", arXiv:2502.06023) is the
    same objective; only the inputs differ: the winner's errors are computed conditioned on the
    winner's own caption and the loser's on its own caption (registered here as the alias
    ``dcpo``). InPO (:func:`ddim_inversion_step`, :func:`inversion_target`) also keeps this
    objective and changes how x_t and the target noise are made.

    Args:
      chosen_errors, rejected_errors: [B] model errors on winner / loser.
      ref_chosen_errors, ref_rejected_errors: [B] reference errors (same t and noise).
      beta: KL strength (default 5000, the paper's Stable Diffusion 1.5 setting).

    Returns:
      [B] per-example losses.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> errors_w, errors_l = jnp.array([0.10, 0.20]), jnp.array([0.30, 0.20])
      >>> ref_w, ref_l = jnp.array([0.10, 0.20]), jnp.array([0.30, 0.20])
      >>> print(np.asarray(diffusion_dpo(errors_w, errors_l, ref_w, ref_l), float).round(4))
      [0.6931 0.6931]
      >>> loss = diffusion_dpo(errors_w - 1e-4, errors_l + 1e-4, ref_w, ref_l)
      >>> print(np.asarray(loss, float).round(4))
      [0.4741 0.4741]
    """
    arrays = [chosen_errors, rejected_errors, ref_chosen_errors, ref_rejected_errors]
    chex.assert_rank(arrays, 1)
    chex.assert_equal_shape(arrays)
    e_w, e_l, r_w, r_l = (at_least_f32(a) for a in arrays)
    inside = -0.5 * beta * ((e_w - r_w) - (e_l - r_l))
    return -jax.nn.log_sigmoid(inside)


def _alpha_bar(alphas_cumprod: chex.Array, t: chex.Array, like: jax.Array) -> jax.Array:
    """alpha_bar_t broadcast against ``like`` [B, ...]; t = -1 gives 1 (the clean end)."""
    chex.assert_rank(alphas_cumprod, 1)
    a = at_least_f32(alphas_cumprod)
    t = jnp.asarray(t, jnp.int32)
    value = jnp.where(t >= 0, a[jnp.clip(t, 0, a.shape[0] - 1)], jnp.ones((), a.dtype))
    if value.ndim == 1:  # per-example timesteps [B]
        chex.assert_shape(value, (like.shape[0],))
        value = value.reshape(value.shape + (1,) * (like.ndim - 1))
    return value


def ddim_step(
    x_t: chex.Array, eps_pred: chex.Array, alphas_cumprod: chex.Array, t: chex.Array, t_prev: chex.Array
) -> jax.Array:
    """Deterministic DDIM step (eta = 0), x_t -> x_{t_prev}.

    "Denoising Diffusion Implicit Models" (Song et al., arXiv:2010.02502):
    x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);  x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps.

    Args:
      x_t: [B, ...] the noisy sample at step t.
      eps_pred: [B, ...] the predicted noise.
      alphas_cumprod: [N] the schedule's alpha_bar.
      t, t_prev: int scalars or [B] (t_prev = -1: the clean sample).

    Returns:
      x_{t_prev}, [B, ...].
    """
    chex.assert_equal_shape([x_t, eps_pred])
    x, eps = at_least_f32(x_t), at_least_f32(eps_pred)
    a_t, a_prev = _alpha_bar(alphas_cumprod, t, x), _alpha_bar(alphas_cumprod, t_prev, x)
    x0 = (x - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps


def ddim_inversion_step(
    x_prev: chex.Array, eps_pred: chex.Array, alphas_cumprod: chex.Array, t_prev: chex.Array, t: chex.Array
) -> jax.Array:
    """Deterministic DDIM inversion step, x_{t_prev} -> x_t (the inverse of :func:`ddim_step`).

    x0_hat = (x_prev - sqrt(1 - a_prev) eps) / sqrt(a_prev);  x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps,
    with eps = eps_theta evaluated at the previous point (the usual inversion approximation).
    Used by InPO ("InPO: Inversion Preference Optimization with Reparametrized DDIM for Efficient
    Diffusion Model Alignment", arXiv:2503.18454) to map x_0 to x_t deterministically.

    Args:
      x_prev: [B, ...] the sample at step t_prev.
      eps_pred: [B, ...] the predicted noise.
      alphas_cumprod: [N] the schedule's alpha_bar.
      t_prev, t: int scalars or [B] (t_prev = -1: the clean sample).

    Returns:
      x_t, [B, ...].

    Examples:
      For a fixed eps the two steps undo each other:

      >>> import jax.numpy as jnp
      >>> a = jnp.linspace(0.99, 0.5, 10)
      >>> x, eps = jnp.ones((1, 2)), jnp.full((1, 2), 0.3)
      >>> x_t = ddim_inversion_step(x, eps, a, -1, 4)
      >>> bool(jnp.allclose(ddim_step(x_t, eps, a, 4, -1), x, atol=1e-6))
      True
    """
    chex.assert_equal_shape([x_prev, eps_pred])
    x, eps = at_least_f32(x_prev), at_least_f32(eps_pred)
    a_prev, a_t = _alpha_bar(alphas_cumprod, t_prev, x), _alpha_bar(alphas_cumprod, t, x)
    x0 = (x - jnp.sqrt(1.0 - a_prev) * eps) / jnp.sqrt(a_prev)
    return jnp.sqrt(a_t) * x0 + jnp.sqrt(1.0 - a_t) * eps


def inversion_target(x0: chex.Array, x_t: chex.Array, alphas_cumprod: chex.Array, t: chex.Array) -> jax.Array:
    """The noise InPO trains against: eps_hat = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t).

    InPO reparametrises the inverted latent x_t (from DDIM inversion of x0) as one forward-noising
    jump x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps_hat; the errors fed to :func:`diffusion_dpo` are
    then :func:`denoising_error` (eps_hat, eps_theta(x_t, t, c)). Our reading of the paper's
    "reparametrized DDIM"; detached (the target is data).

    Args:
      x0: [B, ...] the clean sample.
      x_t: [B, ...] its inverted latent at step t.
      alphas_cumprod: [N] the schedule's alpha_bar.
      t: int scalar or [B].

    Returns:
      eps_hat, [B, ...], no gradient.
    """
    chex.assert_equal_shape([x0, x_t])
    x0f, xtf = at_least_f32(x0), at_least_f32(x_t)
    a_t = _alpha_bar(alphas_cumprod, t, x0f)
    return jax.lax.stop_gradient((xtf - jnp.sqrt(a_t) * x0f) / jnp.sqrt(1.0 - a_t))
