"""Reward-model objectives: scalar (Bradley-Terry), ensemble-strength, GPM and PAL.

Array conventions (B pairs):

- ``chosen_rewards`` / ``rejected_rewards`` [B]: scalar rewards of the chosen / rejected completion.
- ``margin`` [B]: optional per-pair margin (e.g. from rating gaps).
- ``reward_diffs`` [M, B]: r_m(y_w) - r_m(y_l) for an ensemble of M reward models.
- ``chosen_embeddings`` / ``rejected_embeddings`` [B, 2k]: GPM preference embeddings.
- ``chosen_features`` / ``rejected_features`` [B, D]: PAL response features f(x, y).

Every loss returns per-example losses [B] in float32; the caller reduces.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from alignjax.losses.common import at_least_f32, smoothed_sigmoid
from alignjax.losses.registry import register

# ----------------------------------------------------------------------------- Bradley-Terry


@register("bradley_terry", family="reward", aliases=("bt",))
def bradley_terry(
    chosen_rewards: chex.Array,
    rejected_rewards: chex.Array,
    margin: chex.Array | None = None,
    *,
    label_smoothing: float = 0.0,
    center_rewards_coefficient: float = 0.0,
) -> jax.Array:
    """Bradley-Terry reward-model loss, with margin, label smoothing and reward centering.

    "Training language models to follow instructions with human feedback" (Ouyang et al.,
    arXiv:2203.02155) for the pairwise loss; margins as in "Llama 2" (arXiv:2307.09288); centering
    as in "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking"
    (Eisenstein et al., arXiv:2312.09244), TRL's ``center_rewards_coefficient``. With
    z = r_w - r_l - margin:

        L = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z) + c (r_w + r_l)^2

    Args:
      chosen_rewards, rejected_rewards: [B] scalar rewards.
      margin: optional [B] margins (None = 0).
      label_smoothing: eps in [0, 0.5) (default 0).
      center_rewards_coefficient: c >= 0 (default 0; TRL suggests 0.01).

    Returns:
      [B] per-example losses. margin 0, eps 0, c 0 gives -log sigmoid(r_w - r_l).

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> chosen, rejected = jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0])
      >>> print(np.asarray(bradley_terry(chosen, rejected), float).round(4))
      [0.3133 0.6931]
      >>> loss = bradley_terry(chosen, rejected, margin=jnp.array([1.0, 0.0]))
      >>> print(np.asarray(loss, float).round(4))
      [0.6931 0.6931]
    """
    chex.assert_rank([chosen_rewards, rejected_rewards], 1)
    chex.assert_equal_shape([chosen_rewards, rejected_rewards])
    r_w, r_l = at_least_f32(chosen_rewards), at_least_f32(rejected_rewards)
    z = r_w - r_l
    if margin is not None:
        chex.assert_equal_shape([margin, chosen_rewards])
        z = z - at_least_f32(margin)
    return smoothed_sigmoid(z, label_smoothing) + center_rewards_coefficient * jnp.square(r_w + r_l)


# ----------------------------------------------------------------------------- Secrets of RLHF II


def preference_strength(reward_diffs: chex.Array) -> tuple[jax.Array, jax.Array]:
    """Preference strength of each pair from an ensemble of reward models.

    "Secrets of RLHF in Large Language Models Part II: Reward Modeling" (Wang et al.,
    arXiv:2401.06080): d_{m,i} = r_m(y_w,i) - r_m(y_l,i) for M models; the strength is the ensemble
    mean mu_i and the spread is the population standard deviation sigma_i (ddof = 0; M = 1 gives 0).

    Args:
      reward_diffs: [M, B].

    Returns:
      (mean [B], std [B]), detached: strength is data annotation, not a training signal.
    """
    chex.assert_rank(reward_diffs, 2)
    d = jax.lax.stop_gradient(at_least_f32(reward_diffs))
    return jnp.mean(d, axis=0), jnp.std(d, axis=0)


def strength_thresholds(
    strength_mean: chex.Array, *, flip_fraction: float = 0.1, smooth_fraction: float = 0.2
) -> tuple[float, float]:
    """Dataset-level thresholds for :func:`secrets_rm` from the whole dataset's mean strengths.

    The paper ranks the *whole dataset* by preference strength (not one batch), so this runs once,
    host-side, over all pairs.

    Args:
      strength_mean: [N] every pair's ensemble mean strength (:func:`preference_strength`).
      flip_fraction: the share of pairs in the flip band (default 0.1).
      smooth_fraction: the share in the smoothing band above it (default 0.2).

    Returns:
      ``(flip_below, smooth_below)``: the ``flip_fraction`` and ``flip_fraction + smooth_fraction``
      quantiles of ``strength_mean``.
    """
    s = np.asarray(strength_mean, np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("strength_thresholds: strength_mean is empty")
    if not 0.0 <= flip_fraction <= flip_fraction + smooth_fraction <= 1.0:
        raise ValueError(
            f"strength_thresholds: need 0 <= flip_fraction <= flip_fraction + smooth_fraction <= 1, "
            f"got flip_fraction={flip_fraction}, smooth_fraction={smooth_fraction}"
        )
    return float(np.quantile(s, flip_fraction)), float(np.quantile(s, flip_fraction + smooth_fraction))


@register("secrets_rm", family="reward")
def secrets_rm(
    chosen_rewards: chex.Array,
    rejected_rewards: chex.Array,
    strength_mean: chex.Array,
    *,
    flip_below: float = 0.0,
    smooth_below: float = 0.0,
    label_smoothing: float = 0.1,
    margin_coef: float = 1.0,
) -> jax.Array:
    """Strength-aware reward-model loss: label flipping, label smoothing, adaptive margin.

    "Secrets of RLHF in Large Language Models Part II: Reward Modeling" (Wang et al.,
    arXiv:2401.06080). Given the ensemble mean strength mu (:func:`preference_strength`):

        flip   = mu < min(flip_below, 0)       (the ensemble prefers the "rejected" response)
        s      = -1 if flip else +1            (flipping swaps the pair: dr -> -dr, mu -> -mu)
        smooth = not flip and mu < smooth_below
        eps    = label_smoothing if smooth else 0
        z      = s (r_w - r_l) - margin_coef * s mu
        L      = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)

    Decision (documented, tested): a pair is flipped only when it is in the low-strength band *and*
    its mean strength is negative, so a pair the ensemble agrees with is never flipped. The paper
    ranks the whole dataset; get the band edges with :func:`strength_thresholds` (e.g. lowest 10%
    flipped, next 20% smoothed) and pass them as ``flip_below`` / ``smooth_below``. The defaults
    flip every negative-strength pair and smooth none. The adaptive margin is mu itself (after the
    flip), so a weakly-held preference asks for a small reward gap. The paper's contrastive
    auxiliary term is not part of this function.

    Args:
      chosen_rewards, rejected_rewards: [B] scalar rewards of the model being trained.
      strength_mean: [B] ensemble mean of r(y_w) - r(y_l) (detached).
      flip_below, smooth_below: strength thresholds (see above).
      label_smoothing: eps for the smoothing band (default 0.1).
      margin_coef: scale of the adaptive margin (default 1.0; 0 disables it).

    Returns:
      [B] per-example losses.
    """
    chex.assert_rank([chosen_rewards, rejected_rewards, strength_mean], 1)
    chex.assert_equal_shape([chosen_rewards, rejected_rewards, strength_mean])
    mu = jax.lax.stop_gradient(at_least_f32(strength_mean))
    flip = mu < min(flip_below, 0.0)
    sign = jnp.where(flip, -1.0, 1.0)
    smooth = jnp.logical_and(~flip, mu < smooth_below)
    eps = jnp.where(smooth, label_smoothing, 0.0)
    z = sign * (at_least_f32(chosen_rewards) - at_least_f32(rejected_rewards)) - margin_coef * sign * mu
    return smoothed_sigmoid(z, eps)


# ----------------------------------------------------------------------------- GPM


def gpm_score(v_i: chex.Array, v_j: chex.Array, *, scales: chex.Array | None = None) -> jax.Array:
    """GPM's skew-symmetric preference score s(i > j) = <R v_i, v_j>.

    "Beyond Bradley-Terry Models: A General Preference Model for Language Model Alignment"
    (Zhang et al., arXiv:2410.02197). R is block-diagonal with k blocks [[0, -1], [1, 0]] over the
    embedding dimension 2k, optionally scaled per block by prompt-dependent lambda_b >= 0:

        s(i > j) = sum_b lambda_b (v_i[2b] v_j[2b+1] - v_i[2b+1] v_j[2b])

    i.e. a sum of 2-D cross products, so s(i, j) = -s(j, i) and s(i, i) = 0 exactly.

    Args:
      v_i, v_j: [..., 2k] preference embeddings (same shape).
      scales: optional [..., k] per-block scales lambda (None = 1).

    Returns:
      [...] scores (fp32).
    """
    chex.assert_equal_shape([v_i, v_j])
    dim = v_i.shape[-1]
    if dim % 2:
        raise ValueError(f"gpm_score: embedding dimension must be even (2k), got {dim}")
    a = at_least_f32(v_i).reshape(*v_i.shape[:-1], dim // 2, 2)
    b = at_least_f32(v_j).reshape(*v_j.shape[:-1], dim // 2, 2)
    cross = a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]  # [..., k]
    if scales is not None:
        chex.assert_shape(scales, (*v_i.shape[:-1], dim // 2))
        cross = cross * at_least_f32(scales)
    return jnp.sum(cross, axis=-1)


@register("gpm", family="reward")
def gpm(
    chosen_embeddings: chex.Array,
    rejected_embeddings: chex.Array,
    scales: chex.Array | None = None,
    margin: chex.Array | None = None,
    *,
    tau: float = 0.1,
) -> jax.Array:
    """General Preference Model loss: -log sigmoid((s(y_w > y_l) - margin) / tau).

    "Beyond Bradley-Terry Models: A General Preference Model for Language Model Alignment"
    (Zhang et al., arXiv:2410.02197). P(y_w > y_l) = sigmoid(s / tau) with the skew-symmetric
    score of :func:`gpm_score`; it can represent cyclic (intransitive) preferences that a scalar
    Bradley-Terry reward cannot. The margin is subtracted before the temperature, as the official
    code's ``--margin_loss`` does (general_preference/models/loss.py).

    Args:
      chosen_embeddings, rejected_embeddings: [B, 2k] preference embeddings (the GPM head's output;
        the head decides whether they are L2-normalised).
      scales: optional [B, k] prompt-dependent per-block scales.
      margin: optional [B] per-pair margins (None = 0).
      tau: temperature (default 0.1).

    Returns:
      [B] per-example losses.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> chosen, rejected = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])
      >>> print(gpm_score(chosen, rejected).tolist(), gpm_score(rejected, chosen).tolist())
      [1.0] [-1.0]
      >>> print(np.asarray(gpm(chosen, rejected, tau=1.0), float).round(4))
      [0.3133]
    """
    chex.assert_rank([chosen_embeddings, rejected_embeddings], 2)
    score = gpm_score(chosen_embeddings, rejected_embeddings, scales=scales)
    if margin is not None:
        chex.assert_shape(margin, score.shape)
        score = score - at_least_f32(margin)
    return -jax.nn.log_sigmoid(score / tau)


# ----------------------------------------------------------------------------- PAL


def pal_ideal_point(user_logits: chex.Array, prototypes: chex.Array) -> jax.Array:
    """PAL's per-user ideal point u_i = sum_k softmax(w_i)_k g_k.

    "PAL: Pluralistic Alignment Framework for Learning from Heterogeneous Preferences"
    (Chen et al., arXiv:2406.08469).

    Args:
      user_logits: [B, K] the user's mixture logits w_i (a new user fits only these).
      prototypes: [K, D] shared prototypes g_k, or [B, K, D] prompt-dependent prototypes g_k(x).

    Returns:
      [B, D] ideal points.
    """
    chex.assert_rank(user_logits, 2)
    weights = jax.nn.softmax(at_least_f32(user_logits), axis=-1)
    g = at_least_f32(prototypes)
    if g.ndim == 2:
        chex.assert_shape(g, (user_logits.shape[1], None))
        return weights @ g
    chex.assert_shape(g, (user_logits.shape[0], user_logits.shape[1], None))
    return jnp.einsum("bk,bkd->bd", weights, g)


def pal_reward(
    features: chex.Array, ideal_points: chex.Array, *, scale: float = 1.0, eps: float = 1e-8
) -> jax.Array:
    """PAL reward = scale * cos(f(x, y), u_i).

    Args:
      features: [B, D] response features f(x, y).
      ideal_points: [B, D] the users' ideal points u_i (:func:`pal_ideal_point`).
      scale: the reward scale (default 1.0).
      eps: keeps the gradient finite at a zero vector (default 1e-8).

    Returns:
      [B] rewards.
    """
    chex.assert_rank([features, ideal_points], 2)
    chex.assert_equal_shape([features, ideal_points])
    f, u = at_least_f32(features), at_least_f32(ideal_points)
    # eps inside the sqrt keeps the gradient finite at a zero vector.
    f = f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + eps)
    u = u * jax.lax.rsqrt(jnp.sum(u * u, axis=-1, keepdims=True) + eps)
    return scale * jnp.sum(f * u, axis=-1)


@register("pal", family="reward")
def pal(
    chosen_features: chex.Array,
    rejected_features: chex.Array,
    user_logits: chex.Array,
    prototypes: chex.Array,
    *,
    scale: float = 1.0,
) -> jax.Array:
    """Bradley-Terry loss on PAL ideal-point rewards: -log sigmoid(r_i(y_w) - r_i(y_l)).

    "PAL: Pluralistic Alignment Framework for Learning from Heterogeneous Preferences"
    (Chen et al., arXiv:2406.08469). r_i(y) = scale * cos(f(x, y), u_i),
    u_i = :func:`pal_ideal_point` (user_logits, prototypes).

    Args:
      chosen_features, rejected_features: [B, D] response features f(x, y).
      user_logits: [B, K] mixture logits of the user who labelled each pair.
      prototypes: [K, D] or [B, K, D] prototypes g_k(x).
      scale: reward scale (the role of CLIP's logit scale; default 1.0, pass a learned value).

    Returns:
      [B] per-example losses.
    """
    u = pal_ideal_point(user_logits, prototypes)
    r_w = pal_reward(chosen_features, u, scale=scale)
    r_l = pal_reward(rejected_features, u, scale=scale)
    return -jax.nn.log_sigmoid(r_w - r_l)
