"""Policy-gradient objectives on sampled completions: GRPO (and its DAPO / Dr. GRPO / BNPO
aggregations) and RLOO, with their group-relative advantages, and PPO's pieces (token rewards, GAE,
whitening, the clipped policy + value loss, the adaptive KL coefficient).

Array conventions (N = prompts x G samples per prompt, completions padded to T tokens):

- ``token_logps`` [N, T]: log pi_theta(o_t | q, o_<t) of the current policy (differentiated);
- ``old_token_logps`` [N, T]: the same under the behaviour policy that sampled the completions
  (no gradient; equal to ``token_logps`` on the first step of a rollout batch);
- ``ref_token_logps`` [N, T]: the same under the frozen reference (only read when ``beta != 0``);
- ``mask`` [N, T]: 1 on completion tokens (through the stop token), 0 on padding;
- ``rewards`` [N] (rows ``i G .. i G + G - 1`` are prompt ``i``'s group; NaN = unscorable);
- ``advantages`` [N] (or [N, T]) from :func:`group_advantages` / :func:`rloo_advantages`.

Every loss returns ``(loss, metrics)``: the scalar the optimiser minimises (already aggregated, as
TRL 1.16's ``GRPOTrainer._compute_loss`` / ``RLOOTrainer._compute_loss`` aggregate it) and a dict of
scalar metrics under TRL's names (``kl``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean``). These losses are trained by the online job (``alignjax/online/``), which
samples, scores and computes the arrays; the preference step does not train them.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from alignjax.losses.common import at_least_f32
from alignjax.losses.registry import register

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
_EPS = 1e-4  # TRL's std guard in the advantage normalisation


def nanstd(x: jax.Array, axis: int | None = None, keepdims: bool = False) -> jax.Array:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN for fewer than two values):
    ``trl.trainer.utils.nanstd``, which GRPO/RLOO normalise with.

    Args:
      x: any shape.
      axis: the axis to reduce (None = all).
      keepdims: keep the reduced axis.

    Returns:
      The standard deviation.
    """
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    var = jnp.nanmean(jnp.square(x - mean), axis=axis, keepdims=True)
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True)
    var = jnp.where(count > 1, var * count / jnp.maximum(count - 1, 1), jnp.nan)
    std = jnp.sqrt(var)
    return std if keepdims else jnp.squeeze(std, axis=axis)


def group_advantages(rewards: chex.Array, *, num_generations: int, scale_rewards: str = "group"
                     ) -> jax.Array:
    """GRPO's group-relative advantage (DeepSeekMath, Shao et al., arXiv:2402.03300):

        A_i = (r_i - mean_group(r)) / (std(r) + 1e-4)

    with ``std`` over the group (``scale_rewards='group'``), over the whole batch (``'batch'``), or
    no division at all (``'none'``: Dr. GRPO, Liu et al., arXiv:2503.20783, which drops it as a
    difficulty bias). Means and stds ignore NaN rewards (unscorable completions), whose advantage is
    0, as TRL 1.16's ``GRPOTrainer`` computes it.

    Args:
      rewards: [N] with N = prompts x ``num_generations``, groups contiguous.
      num_generations: G >= 1.
      scale_rewards: "group" (default), "batch" or "none".

    Returns:
      [N] float32 advantages.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # two prompts, three samples each
      >>> adv = group_advantages(rewards, num_generations=3)
      >>> print(np.asarray(adv, float).round(4))
      [ 1.1545 -0.5773 -0.5773 -1.1545  0.5773  0.5773]
      >>> adv = group_advantages(rewards, num_generations=3, scale_rewards="none")
      >>> print(np.asarray(adv, float).round(4))
      [ 0.6667 -0.3333 -0.3333 -0.6667  0.3333  0.3333]
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {SCALE_REWARDS}")
    r = at_least_f32(rewards)
    chex.assert_rank(r, 1)
    G = int(num_generations)
    grouped = r.reshape(-1, G)
    mean = jnp.repeat(jnp.nanmean(grouped, axis=1), G)
    adv = r - mean
    if scale_rewards == "group":
        std = jnp.repeat(nanstd(grouped, axis=1), G) if G > 1 else jnp.zeros_like(r)
        adv = adv / (std + _EPS)
    elif scale_rewards == "batch":
        std = nanstd(r) if r.size > 1 else jnp.zeros(())
        adv = adv / (std + _EPS)
    return jnp.nan_to_num(adv, nan=0.0)


def rloo_advantages(rewards: chex.Array, *, num_generations: int, normalize: bool = False) -> jax.Array:
    """RLOO's leave-one-out advantage ("Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs", Ahmadian et al., arXiv:2402.14740):

        A_i = r_i - (sum_{j in group, j != i} r_j) / (G - 1)

    over the scorable (non-NaN) siblings; ``normalize`` then standardises over the batch,
    ``(A - mean A) / (std A + 1e-4)`` (TRL's ``normalize_advantages``). NaN rows get 0; so does every
    row when G = 1.

    Args:
      rewards: [N] (already KL-penalised if the reward carries the KL, see
        :func:`kl_penalized_rewards`), groups of ``num_generations`` contiguous.
      num_generations: G >= 1.
      normalize: standardise over the batch (default False).

    Returns:
      [N] float32 advantages.

    Examples:
      >>> import jax.numpy as jnp
      >>> rloo_advantages(jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), num_generations=3).tolist()
      [1.0, -0.5, -0.5, -1.0, 0.5, 0.5]
    """
    r = at_least_f32(rewards)
    chex.assert_rank(r, 1)
    G = int(num_generations)
    if G > 1:
        grouped = r.reshape(-1, G)
        count = jnp.sum(~jnp.isnan(grouped), axis=1, keepdims=True)
        total = jnp.nansum(grouped, axis=1, keepdims=True)
        adv = r - ((total - grouped) / (count - 1)).reshape(-1)
    else:
        adv = jnp.zeros_like(r)
    if normalize:
        adv = (adv - jnp.nanmean(adv)) / (nanstd(adv) + _EPS)
    return jnp.nan_to_num(adv, nan=0.0)


def kl_penalized_rewards(rewards: chex.Array, old_token_logps: chex.Array, ref_token_logps: chex.Array,
                         mask: chex.Array, *, beta: float) -> jax.Array:
    """RLOO's KL-in-the-reward: ``r_i - beta sum_t m_it (log pi_old - log pi_ref)`` (the first-order
    estimator, summed per sequence; Ahmadian et al. and TRL 1.16's ``RLOOTrainer``).

    Args:
      rewards: [N] sequence rewards.
      old_token_logps, ref_token_logps, mask: [N, T] behaviour and reference token log-probs, mask.
      beta: the KL coefficient.

    Returns:
      [N] penalised rewards.
    """
    kl = at_least_f32(old_token_logps) - at_least_f32(ref_token_logps)
    kl = jnp.sum(kl * at_least_f32(mask), axis=-1)
    return at_least_f32(rewards) - beta * kl


def k3_kl(token_logps: chex.Array, ref_token_logps: chex.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: ``exp(d) - d - 1``, d = log pi_ref - log pi
    (>= 0, unbiased under samples of pi).

    Args:
      token_logps, ref_token_logps: [N, T] policy and reference token log-probs.

    Returns:
      [N, T] per-token estimates.
    """
    d = at_least_f32(ref_token_logps) - at_least_f32(token_logps)
    return jnp.exp(d) - d - 1.0


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    x = jnp.broadcast_to(x, mask.shape)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _clip_metrics(ratio: jax.Array, adv: jax.Array, epsilon_low: float, epsilon_high: float,
                  mean: object) -> dict[str, jax.Array]:
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).astype(jnp.float32)
    return {"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high),
            "clip_ratio/region_mean": mean(jnp.maximum(low, high))}


@register("grpo", family="policy_gradient")
def grpo(
    token_logps: chex.Array,
    old_token_logps: chex.Array,
    ref_token_logps: chex.Array | None,
    mask: chex.Array,
    advantages: chex.Array,
    num_items_in_batch: chex.Array | None = None,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    delta: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's clipped surrogate with a k3 KL penalty (DeepSeekMath, Shao et al., arXiv:2402.03300),
    aggregated as TRL 1.16's ``GRPOTrainer`` ``loss_type``:

        w_it = pi_theta / pi_old  (token level; ``importance_sampling_level='sequence'``: GSPO's
               exp(mean_t log-ratio), Zheng et al., arXiv:2507.18071)
        l_it = -min(w_it A_i, clip(w_it, 1 - eps_low, 1 + eps_high) A_i) + beta k3_it
        grpo:    mean_i (sum_t m_it l_it / |o_i|)
        bnpo:    sum_it m_it l_it / sum_it m_it                       (this batch's tokens)
        dr_grpo: sum_it m_it l_it / (N x max_completion_length)       (Dr. GRPO, arXiv:2503.20783)
        dapo:    sum_it m_it l_it / num_items_in_batch                (DAPO, arXiv:2503.14476: all tokens
                 of the generation batch; default this batch's)

    ``eps_high > eps_low`` is DAPO's clip-higher; ``delta`` caps w from above as well (INTELLECT-2's
    two-sided clipping); ``beta = 0`` skips the reference entirely (``ref_token_logps`` may be None).
    With the policy equal to the behaviour policy (first step on a rollout) w = 1 and the gradient
    is the policy gradient of the advantage-weighted log-likelihood.

    Args:
      token_logps, old_token_logps, ref_token_logps, mask: [N, T].
      advantages: [N] (or [N, T]).
      num_items_in_batch: scalar token count for ``dapo`` (default ``sum(mask)``).
      max_completion_length: ``dr_grpo``'s constant (default T).

    Returns:
      (scalar loss, metrics ``kl`` (when beta != 0), ``clip_ratio/{low,high,region}_mean``).

    Examples:
      On the first step of a rollout batch the policy is the behaviour policy (ratio 1), so the loss is
      minus the mean advantage over the batch's tokens; the gradient is the policy gradient.

      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> token_logps = jnp.array([[-1.0, -2.0, 0.0], [-1.5, 0.0, 0.0]])
      >>> mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
      >>> advantages = jnp.array([1.0, -1.0])
      >>> loss, metrics = grpo(token_logps, token_logps, None, mask, advantages)
      >>> print(np.asarray(loss, float).round(4), float(metrics["clip_ratio/region_mean"]))
      -0.3333 0.0
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}: 'token' or 'sequence'")
    logp, old, m = at_least_f32(token_logps), at_least_f32(old_token_logps), at_least_f32(mask)
    chex.assert_rank([logp, old, m], 2)
    chex.assert_equal_shape([logp, old, m])
    adv = at_least_f32(advantages)
    adv = adv[:, None] if adv.ndim == 1 else adv
    log_ratio = logp - jax.lax.stop_gradient(old)
    if importance_sampling_level == "sequence":
        log_ratio = (jnp.sum(log_ratio * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0))[:, None]
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:  # the clip statistics below see the capped ratio too, as TRL's do
        ratio = jnp.minimum(ratio, delta)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    metrics: dict[str, jax.Array] = {}
    if beta != 0.0:
        if ref_token_logps is None:
            raise ValueError("grpo: beta != 0 needs ref_token_logps")
        kl = k3_kl(logp, ref_token_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = _masked_mean(kl, m)
    per_token = jnp.broadcast_to(per_token, m.shape) * m
    if loss_type == "grpo":
        loss = jnp.mean(jnp.sum(per_token, -1) / jnp.maximum(jnp.sum(m, -1), 1.0))
    elif loss_type == "bnpo":
        loss = jnp.sum(per_token) / jnp.maximum(jnp.sum(m), 1.0)
    elif loss_type == "dr_grpo":
        L = m.shape[1] if max_completion_length is None else int(max_completion_length)
        loss = jnp.sum(per_token) / (m.shape[0] * L)
    else:
        items = jnp.sum(m) if num_items_in_batch is None else at_least_f32(num_items_in_batch)
        loss = jnp.sum(per_token) / jnp.maximum(items, 1.0)
    if importance_sampling_level == "sequence":
        seq_mean = lambda x: jnp.mean(jnp.broadcast_to(x, (m.shape[0], 1)))
        metrics.update(_clip_metrics(ratio, adv, epsilon_low, epsilon_high, seq_mean))
    else:
        metrics.update(_clip_metrics(ratio, adv, epsilon_low, epsilon_high, lambda x: _masked_mean(x, m)))
    return loss, metrics


@register("rloo", family="policy_gradient")
def rloo(
    token_logps: chex.Array,
    old_logps: chex.Array,
    mask: chex.Array,
    advantages: chex.Array,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RLOO's clipped sequence-level surrogate (Ahmadian et al., arXiv:2402.14740, with PPO's clip as
    TRL 1.16's ``RLOOTrainer``), the KL to the reference being in the reward
    (:func:`kl_penalized_rewards`) and the advantage leave-one-out (:func:`rloo_advantages`):

        w_i = exp(sum_t m_it log pi_theta - old_logps_i)
        L   = mean_i -min(w_i A_i, clip(w_i, 1 - eps_low, 1 + eps_high) A_i)

    Args:
      token_logps, mask: [N, T] policy token log-probs and completion mask.
      old_logps: [N] the behaviour policy's summed completion log-probs.
      advantages: [N].
      epsilon_low, epsilon_high: the clip range (default 0.2 each).

    Returns:
      (scalar loss, metrics ``clip_ratio/{low,high,region}_mean`` over sequences).
    """
    logp, m = at_least_f32(token_logps), at_least_f32(mask)
    chex.assert_rank([logp, m], 2)
    seq = jnp.sum(logp * m, axis=-1)
    adv = at_least_f32(advantages)
    ratio = jnp.exp(seq - jax.lax.stop_gradient(at_least_f32(old_logps)))
    clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = jnp.mean(-jnp.minimum(ratio * adv, clipped * adv))
    return loss, _clip_metrics(ratio, adv, epsilon_low, epsilon_high, jnp.mean)


# ----------------------------------------------------------------------------- PPO


def masked_mean(x: chex.Array, mask: chex.Array) -> jax.Array:
    """``sum(x m) / sum(m)`` over all entries (no guard: an all-zero mask gives NaN, as TRL's).

    Args:
      x: any shape.
      mask: the shape of ``x``.

    Returns:
      A scalar.
    """
    return jnp.sum(at_least_f32(x) * mask) / jnp.sum(mask)


def masked_whiten(x: chex.Array, mask: chex.Array, *, shift_mean: bool = True) -> jax.Array:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked entries (Bessel-corrected variance), the mean
    added back with ``shift_mean=False``: TRL 0.x's ``trl.core.masked_whiten``.

    Args:
      x: any shape.
      mask: the shape of ``x``.
      shift_mean: False keeps the mean (whitens the scale only).

    Returns:
      The whitened ``x``.
    """
    x, m = at_least_f32(x), at_least_f32(mask)
    mean = masked_mean(x, m)
    n = jnp.sum(m)
    var = masked_mean(jnp.square(x - mean), m) * n / (n - 1)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def ppo_token_rewards(scores: chex.Array, token_logps: chex.Array, ref_token_logps: chex.Array,
                      mask: chex.Array, *, kl_coef: float) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards of PPO-RLHF ("Fine-Tuning Language Models from Human Preferences", Ziegler
    et al., arXiv:1909.08593; TRL 0.x ``PPOTrainer.compute_rewards``): the KL penalty
    ``-kl_coef (log pi - log pi_ref)`` on every token, plus the sequence's score on its last masked
    token.

    Args:
      scores: [N] sequence scores (a reward model's or a verifier's).
      token_logps, ref_token_logps, mask: [N, T].
      kl_coef: the KL penalty's coefficient.

    Returns:
      ``(rewards, non_score_rewards)``, both [N, T].
    """
    kl = at_least_f32(token_logps) - at_least_f32(ref_token_logps)
    non_score = -kl_coef * kl
    m = at_least_f32(mask)
    T = m.shape[1]
    last = T - 1 - jnp.argmax(m[:, ::-1] > 0, axis=1)
    onehot = jax.nn.one_hot(last, T, dtype=jnp.float32)
    return non_score + onehot * at_least_f32(scores)[:, None], non_score


def gae(rewards: chex.Array, values: chex.Array, mask: chex.Array, *, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation ("High-Dimensional Continuous Control Using Generalized
    Advantage Estimation", Schulman et al., arXiv:1506.02438) over the masked tokens, as TRL 0.x's
    ``PPOTrainer.loss``: with V and r zeroed off the mask,
    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}`` (0 past the end);
    ``returns = A + V``.

    Args:
      rewards, values, mask: [N, T] token rewards, value estimates and completion mask.
      gamma: the discount (default 1.0).
      lam: GAE's lambda (default 0.95).

    Returns:
      ``(advantages, returns)``, both [N, T] (advantages not whitened).
    """
    m = at_least_f32(mask)
    v, r = at_least_f32(values) * m, at_least_f32(rewards) * m
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    delta = r + gamma * next_v - v

    def back(carry, d):
        a = d + gamma * lam * carry
        return a, a

    _, adv = jax.lax.scan(back, jnp.zeros(v.shape[0], jnp.float32), delta.T, reverse=True)
    adv = adv.T
    return adv, adv + v


def adaptive_kl_coef(value: float, current_kl: float, n_steps: int, *, target: float,
                     horizon: float) -> float:
    """One update of the adaptive KL coefficient (Ziegler et al.; TRL 0.x ``AdaptiveKLController``):
    ``value (1 + clip(KL / target - 1, -0.2, 0.2) n_steps / horizon)``.

    Args:
      value: the current coefficient.
      current_kl: the measured KL.
      n_steps: steps since the last update.
      target: the target KL.
      horizon: the controller's horizon.

    Returns:
      The new coefficient.
    """
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return value * (1.0 + error * n_steps / horizon)


def ppo(
    token_logps: chex.Array,
    old_token_logps: chex.Array,
    vpreds: chex.Array,
    values: chex.Array,
    rewards: chex.Array,
    mask: chex.Array,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    whiten_rewards: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped policy and value losses on token rewards ("Proximal Policy Optimization
    Algorithms", Schulman et al., arXiv:1707.06347; for language models Ziegler et al.,
    arXiv:1909.08593, as TRL 0.x's ``PPOTrainer.loss``; the "Unpacking DPO and PPO" recipe,
    Ivison et al., arXiv:2406.09279, uses the same loss). Not registered: no job trains it yet (a
    PPO job needs the policy with a value head in one train state):

        A, R  = gae(rewards, values)             (behaviour values; A whitened over the mask)
        L_pg  = mean_m max(-A w, -A clip(w, 1 - c, 1 + c)),  w = pi_theta / pi_old
        L_vf  = 0.5 mean_m max((v - R)^2, (clip(v, V - c_v, V + c_v) - R)^2)
        L     = L_pg + vf_coef L_vf

    ``whiten_rewards`` first whitens the rewards over the mask without shifting their mean
    (``masked_whiten(..., shift_mean=False)``).

    Args:
      token_logps, old_token_logps: [N, T] current and behaviour log-probs of the sampled tokens.
      vpreds, values: [N, T] current and behaviour value-head outputs at those tokens.
      rewards: [N, T] from :func:`ppo_token_rewards` (score + KL penalty).
      mask: [N, T] completion tokens.

    Returns:
      (scalar loss, metrics ``ppo/loss/policy``, ``ppo/loss/value``, ``ppo/policy/clipfrac``,
      ``ppo/val/clipfrac``, ``ppo/policy/approxkl``, ``ppo/returns/mean``) as TRL 0.x names them.
    """
    m = at_least_f32(mask)
    logp, old = at_least_f32(token_logps), jax.lax.stop_gradient(at_least_f32(old_token_logps))
    v_old = jax.lax.stop_gradient(at_least_f32(values))
    r = jax.lax.stop_gradient(at_least_f32(rewards))
    if whiten_rewards:
        r = masked_whiten(r, m, shift_mean=False) * m
    adv, returns = gae(r, v_old, m, gamma=gamma, lam=lam)
    adv = jax.lax.stop_gradient(masked_whiten(adv, m))
    v_old = v_old * m
    vp = at_least_f32(vpreds)
    vp_clipped = jnp.clip(vp, v_old - cliprange_value, v_old + cliprange_value)
    vf1, vf2 = jnp.square(vp - returns), jnp.square(vp_clipped - returns)
    vf_loss = 0.5 * masked_mean(jnp.maximum(vf1, vf2), m)
    ratio = jnp.exp(logp - old)
    pg1, pg2 = -adv * ratio, -adv * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(jnp.maximum(pg1, pg2), m)
    loss = pg_loss + vf_coef * vf_loss
    metrics = {
        "ppo/loss/policy": pg_loss, "ppo/loss/value": vf_coef * vf_loss,
        "ppo/policy/clipfrac": masked_mean((pg2 > pg1).astype(jnp.float32), m),
        "ppo/val/clipfrac": masked_mean((vf2 > vf1).astype(jnp.float32), m),
        "ppo/policy/approxkl": 0.5 * masked_mean(jnp.square(logp - old), m),
        "ppo/returns/mean": masked_mean(returns, m),
    }
    return loss, metrics
