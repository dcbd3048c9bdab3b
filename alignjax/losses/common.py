"""What the loss families share: dtype casts, input checks, lengths, the NLL term, the f-divergence
transform of DPO-style log-ratios and the label-smoothed logistic loss.

Every family module (``pairwise``, ``reference_free``, ``reward``, ...) imports these from here, so a
family module holds only its own losses and no family imports another for a helper.

Notation as in :mod:`alignjax.losses.pairwise`: S = summed log-prob of a completion under the policy,
R = the same under the reference, u = S - R, n = completion length in tokens, ls = log-sigmoid.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
NLL_REDUCTIONS = ("sequence", "tokens")
# exp() arguments are capped here so that fp32 stays finite (TRL caps at 80 as well).
EXP_CAP = 80.0


def as_f32(*xs: Array) -> tuple[Array, ...]:
    """Casts inputs to float32: log-sums and sigmoids are computed in fp32 whatever the model dtype.

    Args:
      *xs: arrays (or array-likes) of any dtype.

    Returns:
      A tuple of float32 arrays, one per input.

    Examples:
      >>> import jax.numpy as jnp
      >>> (x,) = as_f32(jnp.array([1, 2], jnp.bfloat16))
      >>> x.dtype
      dtype('float32')
    """
    return tuple(jnp.asarray(x).astype(jnp.float32) for x in xs)


def at_least_f32(x: Array) -> Array:
    """Promotes to at least float32: bf16/fp16 become fp32 (so that log-sums are fp32), fp64 stays.

    Args:
      x: an array of any dtype.

    Returns:
      ``x`` in ``promote_types(x.dtype, float32)``.

    Examples:
      >>> import numpy as np
      >>> at_least_f32(np.array([1.0], np.float16)).dtype
      dtype('float32')
    """
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def clamp_lengths(lengths: Array) -> Array:
    """Token counts as float32, clamped to >= 1.

    An empty completion counts as one token, so the length-normalised log-prob of an empty completion
    is its summed log-prob, i.e. 0, not NaN.

    Args:
      lengths: [B] token counts, any numeric dtype.

    Returns:
      [B] float32, each >= 1.

    Examples:
      >>> import jax.numpy as jnp
      >>> clamp_lengths(jnp.array([0, 3])).tolist()
      [1.0, 3.0]
    """
    return jnp.maximum(jnp.asarray(lengths).astype(jnp.float32), 1.0)


def completion_nll(logps: Array, lengths: Array, reduction: str = "sequence") -> Array:
    """Per-example completion NLL, [B]; the caller averages over examples.

        reduction="sequence":  L_i = -S_i / max(n_i, 1)          (each example's own token mean)
        reduction="tokens":    L_i = -S_i / max(mean_j n_j, 1)   (mean_i L_i = -sum S / sum n)

    "tokens" is TRL's reduction (the mean over every completion token of the batch: its ``sft``
    loss_type, RPO's NLL term and SFTTrainer), which weights long completions more; "sequence" keeps
    long and short completions on one scale (RPO's -log M(y_w | x) / |y_w|). Equal lengths: equal.

    Args:
      logps: [B] summed completion log-probs S.
      lengths: [B] completion token counts n.
      reduction: "sequence" (default) or "tokens".

    Returns:
      [B] float32 per-example NLL.

    Examples:
      >>> import jax.numpy as jnp
      >>> s, n = jnp.array([-2.0, -6.0]), jnp.array([1, 3])
      >>> completion_nll(s, n).tolist()
      [2.0, 2.0]
      >>> completion_nll(s, n, "tokens").tolist()
      [1.0, 3.0]
    """
    if reduction not in NLL_REDUCTIONS:
        raise ValueError(f"NLL reduction must be one of {list(NLL_REDUCTIONS)}; got {reduction!r}")
    n = jnp.asarray(lengths, jnp.float32)
    if reduction == "tokens":
        n = jnp.mean(n)
    return -jnp.asarray(logps, jnp.float32) / jnp.maximum(n, 1.0)


def check_vectors(**arrays: Array | None) -> None:
    """Raises unless the given arrays (None skipped) are rank-1 and of one shape [B].

    Args:
      **arrays: the loss's inputs by name (the name is what the error message says).

    Examples:
      >>> import jax.numpy as jnp
      >>> check_vectors(chosen_logps=jnp.zeros(2), margin=None)
      >>> check_vectors(chosen_logps=jnp.zeros((2, 1)))
      Traceback (most recent call last):
      ...
      ValueError: chosen_logps must have shape [B] (one value per example); got shape (2, 1)
    """
    present = {k: v for k, v in arrays.items() if v is not None}
    for k, v in present.items():
        if jnp.ndim(v) != 1:
            raise ValueError(f"{k} must have shape [B] (one value per example); got shape {jnp.shape(v)}")
    chex.assert_equal_shape(list(present.values()))


def check_probability(
    name: str, value: float, *, low_open: bool = False, high: float = 1.0, high_open: bool = False
) -> None:
    """Raises a clear error for a hyperparameter outside its range (instead of NaN losses later).

    Args:
      name: the hyperparameter's name, for the message.
      value: its value.
      low_open: exclude 0 from the range.
      high: the upper end (default 1).
      high_open: exclude ``high`` from the range.

    Examples:
      >>> check_probability("label_smoothing", 0.1)
      >>> check_probability("label_smoothing", 0.5, high=0.5, high_open=True)
      Traceback (most recent call last):
      ...
      ValueError: label_smoothing must be in [0, 0.5); got 0.5
    """
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < high if high_open else value <= high
    if not (lo_ok and hi_ok):
        lo = "(0" if low_open else "[0"
        hi = f"{high:g})" if high_open else f"{high:g}]"
        raise ValueError(f"{name} must be in {lo}, {hi}; got {value!r}")


def f_divergence_score(u: Array, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Array:
    """g(u): the f-divergence transform of the log-ratio u = S - R (TRL ``f_divergence_type``).

    reverse_kl: g(u) = u;  forward_kl: g(u) = 1 - exp(-u);  js_divergence: g(u) = log 2 + ls(u);
    alpha_divergence: g(u) = (exp((a - 1) u) - 1) / (a - 1), a = ``f_alpha`` (default 0.5; a = 1 is u).
    g is f'(pi/pi_ref) of "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints" (arXiv 2309.16240). The additive constants (1, log 2, -1/(a-1)) are kept:
    they cancel in c - d but not in length-normalised losses (IPO's c/n_w - d/n_l). Exponents are
    capped at 80 so extreme log-ratios stay finite in fp32.

    Args:
      u: log-ratios, any shape.
      f_divergence: one of ``F_DIVERGENCES``.
      f_alpha: a, for "alpha_divergence".

    Returns:
      g(u), the shape of ``u``.

    Examples:
      >>> import jax.numpy as jnp
      >>> u = jnp.array([0.0, 1.0])
      >>> f_divergence_score(u).tolist()
      [0.0, 1.0]
      >>> [round(v, 4) for v in f_divergence_score(u, "forward_kl").tolist()]
      [0.0, 0.6321]
    """
    if f_divergence == "reverse_kl":
        return u
    if f_divergence == "forward_kl":
        return 1.0 - jnp.exp(jnp.minimum(-u, EXP_CAP))
    if f_divergence == "js_divergence":
        return jnp.log(2.0) + jax.nn.log_sigmoid(u)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return u
        a1 = f_alpha - 1.0
        return (jnp.exp(jnp.minimum(a1 * u, EXP_CAP)) - 1.0) / a1
    raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}; got {f_divergence!r}")


def pair_scores(
    chosen_logps: Array,
    rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> tuple[Array, Array]:
    """The transformed log-ratios (c, d) = (g(S_w - R_w), g(S_l - R_l)) of a batch of pairs, checked.

    Args:
      chosen_logps, rejected_logps: [B] policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] reference log-probs R_w, R_l.
      f_divergence, f_alpha: the transform g (:func:`f_divergence_score`).

    Returns:
      (c [B], d [B]) in float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> c, d = pair_scores(jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]))
      >>> c.tolist(), d.tolist()
      ([1.0], [-1.0])
    """
    check_vectors(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                  ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    sw, sl, rw, rl = as_f32(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    c = f_divergence_score(sw - rw, f_divergence, f_alpha)
    return c, f_divergence_score(sl - rl, f_divergence, f_alpha)


def smoothed_sigmoid(z: Array, eps: Array | float) -> Array:
    """The logistic loss with label smoothing eps: -(1 - eps) ls(z) - eps ls(-z).

    eps = 0 is -ls(z) (DPO, Bradley-Terry); eps may be a per-example array (MCTS-DPO's visit counts).

    Args:
      z: logits, any shape.
      eps: the probability that the label is flipped, a float or an array broadcasting with ``z``.

    Returns:
      The per-element loss, the shape of ``z``.

    Examples:
      >>> import jax.numpy as jnp
      >>> [round(v, 4) for v in smoothed_sigmoid(jnp.array([0.0, 2.0]), 0.1).tolist()]
      [0.6931, 0.3269]
    """
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler's switch at x = -log 2).

    Args:
      x: negative values, any shape.

    Returns:
      log(1 - exp(x)), the shape of ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> [round(v, 4) for v in log1mexp(jnp.array([-0.1, -5.0])).tolist()]
      [-2.3522, -0.0068]
    """
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(jnp.minimum(x, -1e-30))),
                     jnp.log1p(-jnp.exp(jnp.minimum(x, -jnp.log(2.0)))))
