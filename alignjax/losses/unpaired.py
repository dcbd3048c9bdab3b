"""Unpaired preference objectives: each example is one completion with a binary label.

Array conventions (all leading axis B, one completion per row):

- ``logps`` / ``ref_logps`` [B]: summed completion log-probs under the policy / the reference.
- ``labels`` [B]: bool (or 0/1), True = desirable.
- ``kl_logps`` / ``ref_kl_logps`` [K]: summed log-probs of *mismatched* (prompt, completion) pairs
  (KTO's batch KL estimate; the trainer pairs prompt i with completion i+1 of the same batch, so
  usually K = B; K = 0 is allowed, see :func:`kto`).

Every loss returns per-example losses [B] in float32 (float64 if given float64); the caller reduces.

Stateful losses (registered with ``stateful=True``, e.g. :func:`bco`) take the state as the ordinary
parameter ``state`` and return ``(losses, new_state)``. The function carries an ``init_state``
attribute returning the initial state, so a trainer can hold the state in its train state, thread it
through ``jit`` like any other pytree, and checkpoint it::

    fn = alignjax.losses.get("bco")
    state = fn.init_state()
    losses, state = fn(logps, ref_logps, labels, state, beta=0.1)
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from alignjax.losses.common import at_least_f32
from alignjax.losses.registry import register


def _check_unpaired(logps: chex.Array, ref_logps: chex.Array, labels: chex.Array) -> None:
    chex.assert_rank([logps, ref_logps, labels], 1)
    chex.assert_equal_shape([logps, ref_logps, labels])


def kto_kl_estimate(kl_logps: chex.Array, ref_kl_logps: chex.Array) -> jax.Array:
    """KTO's reference point z0 = max(0, mean_k(kl_logps_k - ref_kl_logps_k)), detached.

    With K = 0 (no mismatched pair could be formed, e.g. batch size 1) z0 = 0, which makes KTO equal to
    ``apo_zero_unpaired``. The estimate is wrapped in ``stop_gradient``: KTO treats it as a fixed
    reference point (TRL detaches it too).

    Args:
      kl_logps: [K] policy log-probs of mismatched (prompt, completion) pairs.
      ref_kl_logps: [K] reference log-probs of the same pairs.

    Returns:
      A float scalar.
    """
    chex.assert_rank([kl_logps, ref_kl_logps], 1)
    chex.assert_equal_shape([kl_logps, ref_kl_logps])
    if kl_logps.shape[0] == 0:  # static shape, not a traced value
        return jnp.zeros((), jnp.promote_types(jnp.asarray(kl_logps).dtype, jnp.float32))
    kl = jnp.mean(at_least_f32(kl_logps) - at_least_f32(ref_kl_logps))
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


@register("kto", family="unpaired")
def kto(
    logps: chex.Array,
    ref_logps: chex.Array,
    labels: chex.Array,
    kl_logps: chex.Array,
    ref_kl_logps: chex.Array,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> jax.Array:
    """KTO: prospect-theoretic loss on unpaired desirable/undesirable completions.

    "KTO: Model Alignment as Prospect Theoretic Optimization" (Ethayarajh et al., arXiv:2402.01306).
    With u = logps - ref_logps and z0 = max(0, mean(kl_logps - ref_kl_logps)) (detached):

        desirable:   lambda_D (1 - sigmoid(beta (u - z0)))
        undesirable: lambda_U (1 - sigmoid(beta (z0 - u)))

    Args:
      logps: [B] summed completion log-probs under the policy.
      ref_logps: [B] the same under the reference.
      labels: [B] bool, True = desirable.
      kl_logps, ref_kl_logps: [K] policy/reference log-probs of mismatched pairs (prompt i with
        completion i+1); see :func:`kto_kl_estimate`. Their gradient is zero by construction.
      beta: inverse temperature (TRL default 0.1).
      desirable_weight: lambda_D (default 1.0).
      undesirable_weight: lambda_U (default 1.0). The paper advises
        lambda_D n_D / (lambda_U n_U) in [1, 4/3].

    Returns:
      [B] per-example losses, each in [0, max(lambda_D, lambda_U)].

    Limits (defined and tested):
      - batch size 1: no mismatched pair exists inside the batch; pass K = 0 arrays and z0 = 0
        (the loss becomes ``apo_zero_unpaired``), or pass K = 1 values from another prompt.
      - no desirable example in the batch: every row uses the undesirable branch; nothing is
        renormalised per class (the caller's mean divides by B), so the value is finite and equals
        lambda_U (1 - sigmoid(beta (z0 - u))) row by row.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> logps, ref_logps = jnp.array([-4.0, -4.0]), jnp.array([-5.0, -5.0])
      >>> labels = jnp.array([True, False])
      >>> kl_logps, ref_kl_logps = jnp.array([-9.0, -9.0]), jnp.array([-9.5, -9.5])
      >>> loss = kto(logps, ref_logps, labels, kl_logps, ref_kl_logps)
      >>> print(np.asarray(loss, float).round(4))
      [0.4875 0.5125]
    """
    _check_unpaired(logps, ref_logps, labels)
    z0 = kto_kl_estimate(kl_logps, ref_kl_logps)
    u = at_least_f32(logps) - at_least_f32(ref_logps)
    desirable = jnp.asarray(labels).astype(bool)
    # 1 - sigmoid(x) = sigmoid(-x): the form that stays accurate for large |x|.
    chosen = desirable_weight * jax.nn.sigmoid(-beta * (u - z0))
    rejected = undesirable_weight * jax.nn.sigmoid(-beta * (z0 - u))
    return jnp.where(desirable, chosen, rejected)


@register("apo_zero_unpaired", family="unpaired")
def apo_zero_unpaired(
    logps: chex.Array,
    ref_logps: chex.Array,
    labels: chex.Array,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> jax.Array:
    """APO-zero, unpaired form (TRL ``KTOConfig.loss_type="apo_zero_unpaired"``).

    "Anchored Preference Optimization and Contrastive Revisions" (D'Oosterlinck et al.,
    arXiv:2408.06266). With u = logps - ref_logps:

        desirable:   lambda_D (1 - sigmoid(beta u))
        undesirable: lambda_U sigmoid(beta u)

    This is :func:`kto` with z0 = 0 (no KL inputs needed).

    Args:
      logps, ref_logps, labels: as in :func:`kto`.
      beta, desirable_weight, undesirable_weight: as in :func:`kto`.

    Returns:
      [B] per-example losses.
    """
    _check_unpaired(logps, ref_logps, labels)
    u = at_least_f32(logps) - at_least_f32(ref_logps)
    desirable = jnp.asarray(labels).astype(bool)
    return jnp.where(
        desirable, desirable_weight * jax.nn.sigmoid(-beta * u), undesirable_weight * jax.nn.sigmoid(beta * u)
    )


class BCOState(NamedTuple):
    """BCO's running reward statistics: ``mean`` (delta) and ``count`` (rewards seen), fp32 scalars."""

    mean: jax.Array
    count: jax.Array

    @classmethod
    def initial(cls) -> BCOState:
        return cls(mean=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.float32))


def bco_update_state(state: BCOState, rewards: chex.Array, *, ema_decay: float | None = None) -> BCOState:
    """Folds a batch of rewards [N] into the running mean (detached).

    ``ema_decay=None`` (default) is TRL's ``RunningMoments``: the cumulative mean of every reward
    seen, mean' = mean + (batch_mean - mean) N / (count + N). With ``ema_decay=a`` the mean is an
    exponential moving average of batch means, mean' = a mean + (1 - a) batch_mean, started at the
    first batch mean. ``count`` is the total number of rewards seen in both cases.

    Args:
      state: the current :class:`BCOState`.
      rewards: [N] this batch's rewards.
      ema_decay: None (cumulative mean) or a in (0, 1).

    Returns:
      The new :class:`BCOState`.
    """
    chex.assert_rank(rewards, 1)
    rewards = jax.lax.stop_gradient(at_least_f32(rewards)).astype(jnp.float32)
    n = jnp.asarray(rewards.shape[0], jnp.float32)
    batch_mean = jnp.mean(rewards)
    mean = jnp.asarray(state.mean, jnp.float32)
    count = jnp.asarray(state.count, jnp.float32)
    total = count + n
    if ema_decay is None:
        new_mean = mean + (batch_mean - mean) * n / total
    else:
        new_mean = jnp.where(count > 0, ema_decay * mean + (1.0 - ema_decay) * batch_mean, batch_mean)
    return BCOState(mean=new_mean, count=total)


def bco_density_ratio(
    probs: chex.Array, *, min_density_ratio: float = 0.5, max_density_ratio: float = 10.0, eps: float = 1e-8
) -> jax.Array:
    """Density-ratio weight w = clip(p / (1 - p + eps), min_density_ratio, max_density_ratio) (BCO UDM).

    Args:
      probs: [B] a prompt classifier's probabilities that a prompt comes from the desirable set (TRL:
        a logistic regression on prompt embeddings).
      min_density_ratio, max_density_ratio: the clip range (TRL's defaults 0.5 and 10.0).
      eps: keeps p = 1 finite (default 1e-8).

    Returns:
      [B] weights, detached (the classifier is trained separately, not through this loss).
    """
    p = jax.lax.stop_gradient(at_least_f32(probs))
    return jnp.clip(p / (1.0 - p + eps), min_density_ratio, max_density_ratio)


@register("bco", family="unpaired", stateful=True)
def bco(
    logps: chex.Array,
    ref_logps: chex.Array,
    labels: chex.Array,
    state: BCOState,
    density_weights: chex.Array | None = None,
    *,
    beta: float = 0.1,
    ema_decay: float | None = None,
    update_state: bool = True,
) -> tuple[jax.Array, BCOState]:
    """BCO: binary classifier optimisation with a running reward baseline.

    "Binary Classifier Optimization for Large Language Model Alignment" (Jung et al.,
    arXiv:2404.04656). With r = beta (logps - ref_logps) and delta the running mean of all rewards
    (detached, updated with this batch *before* use, as TRL does):

        desirable:   -log sigmoid(r - delta)
        undesirable: -w log sigmoid(-(r - delta))

    Args:
      logps, ref_logps: [B] summed completion log-probs (policy / reference).
      labels: [B] bool, True = desirable.
      state: :class:`BCOState`; start from ``bco.init_state()``.
      density_weights: optional [B] underlying-distribution-matching weights w (see
        :func:`bco_density_ratio`); applied to undesirable rows only (desirable rows use 1).
      beta: inverse temperature (TRL default 0.1).
      ema_decay: None = cumulative mean (TRL); a float in (0, 1) = EMA of batch means.
      update_state: False at evaluation (TRL's ``do_train=False``): delta = state.mean, state kept.

    Returns:
      ([B] per-example losses, new state). Stateful calling convention: see the module docstring.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> logps, ref_logps = jnp.array([-4.0, -6.0]), jnp.array([-5.0, -5.0])
      >>> labels = jnp.array([True, False])
      >>> state = bco.init_state()
      >>> loss, state = bco(logps, ref_logps, labels, state)
      >>> print(np.asarray(loss, float).round(4), float(state.count))
      [0.6444 0.6444] 2.0
    """
    _check_unpaired(logps, ref_logps, labels)
    rewards = beta * (at_least_f32(logps) - at_least_f32(ref_logps))
    new_state = bco_update_state(state, rewards, ema_decay=ema_decay) if update_state else state
    delta = jax.lax.stop_gradient(jnp.asarray(new_state.mean)).astype(rewards.dtype)
    desirable = jnp.asarray(labels).astype(bool)
    w = jnp.ones_like(rewards)
    if density_weights is not None:
        chex.assert_equal_shape([density_weights, logps])
        w = at_least_f32(density_weights).astype(rewards.dtype)
    chosen = -jax.nn.log_sigmoid(rewards - delta)
    rejected = -w * jax.nn.log_sigmoid(-(rewards - delta))
    return jnp.where(desirable, chosen, rejected), new_state


bco.init_state = BCOState.initial
