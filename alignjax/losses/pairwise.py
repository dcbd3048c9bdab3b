"""Reference-based pairwise preference losses (the DPO family), as pure functions of arrays.

Notation (shared by every docstring here): S = summed log-prob of a completion under the policy,
R = the same under the reference, u = S - R, n = completion length in tokens (clamped to >= 1),
ls = log-sigmoid, s = sigmoid. Subscripts w / l = chosen / rejected. With the f-divergence option,
c = g(u_w), d = g(u_l) (see :func:`alignjax.losses.common.f_divergence_score`); z = beta (c - d). As
in TRL 1.16, only the losses TRL builds on its ``delta_score`` take the option (sigmoid, hinge, ipo,
exo_pair, robust, discopop, sigmoid_norm); nca_pair, bco_pair, sppo_hard, aot*, apo_* use the raw
log-ratios u.

Array inputs (all shape [B], any float dtype; computed in float32):
``chosen_logps, rejected_logps`` (policy S), ``ref_chosen_logps, ref_rejected_logps`` (reference R),
``chosen_lengths, rejected_lengths`` (completion token counts, where a loss uses them).
Every loss returns per-example losses [B] in float32; the caller reduces.

Hyperparameters are keyword-only Python values (static under ``jax.jit``: close over them or
use ``functools.partial``). The names and semantics follow TRL's ``DPOTrainer`` ``loss_type``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from alignjax.losses.common import (
    EXP_CAP,
    as_f32,
    check_probability,
    check_vectors,
    clamp_lengths,
    pair_scores,
    smoothed_sigmoid,
)
from alignjax.losses.common import completion_nll as completion_nll  # modifiers.py imports it from here
from alignjax.losses.registry import register

Array = jax.Array


# ----------------------------------------------------------------------------- TRL loss types


@register("dpo", family="pairwise", aliases=("sigmoid", "cdpo"))
def dpo(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array, *,
        beta: float = 0.1, label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5) -> Array:
    """DPO (TRL ``sigmoid``), with conservative label smoothing (cDPO) and the f-divergence option.

    Formula: z = beta (c - d);  loss = -(1 - eps) ls(z) - eps ls(-z)   (eps = 0: -ls(z), plain DPO).
    label_smoothing keeps cDPO's meaning (TRL <= 0.28's ``sigmoid``; MCTS-DPO's smoothing). TRL 1.16's
    ``sigmoid`` ignores ``label_smoothing``: alignjax equals it at eps = 0 (tests/losses/test_trl_parity.py).
    Paper: "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
    (arXiv 2305.18290);
    cDPO: "A note on DPO with noisy preferences & relationship to IPO" (Mitchell, 2023).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: inverse temperature (default 0.1).
      label_smoothing: eps in [0, 1], the probability that a label is flipped (default 0.0).
      f_divergence, f_alpha: the transform g of the log-ratios (``common.f_divergence_score``; default
        "reverse_kl", 0.5).

    Returns:
      [B] per-example losses, float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> chosen, rejected = jnp.array([-5.0, -7.0]), jnp.array([-9.0, -6.0])
      >>> ref_chosen, ref_rejected = jnp.array([-6.0, -7.0]), jnp.array([-8.0, -6.0])
      >>> print(np.asarray(dpo(chosen, rejected, ref_chosen, ref_rejected), float).round(4))
      [0.5981 0.6931]

      The second pair's policy equals its reference, so its loss is log 2. Hyperparameters are static:
      close over them under ``jax.jit``.

      >>> import functools, jax
      >>> loss = jax.jit(functools.partial(dpo, beta=0.5, label_smoothing=0.1))
      >>> print(np.asarray(loss(chosen, rejected, ref_chosen, ref_rejected), float).round(4))
      [0.4133 0.6931]
    """
    check_probability("label_smoothing", label_smoothing)
    c, d = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence, f_alpha)
    return smoothed_sigmoid(beta * (c - d), label_smoothing)


@register("slic", family="pairwise", aliases=("hinge",))
def slic(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array, *,
         beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Array:
    """SLiC hinge loss on the DPO logit (TRL ``hinge``).

    Formula: loss = max(0, 1 - beta (c - d)).
    Paper: "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (arXiv 2305.10425).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: default 0.1; 1 / beta is the margin in log-ratio units.
      f_divergence, f_alpha: the transform g of the log-ratios, as in :func:`dpo`.

    Returns:
      [B] per-example losses, float32.
    """
    c, d = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence, f_alpha)
    return jax.nn.relu(1.0 - beta * (c - d))


@register("ipo", family="pairwise")
def ipo(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
        chosen_lengths: Array, rejected_lengths: Array, *, beta: float = 0.1,
        f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Array:
    """IPO, length-normalised as TRL does (the IPO authors' reported form).

    Formula: loss = (c / n_w - d / n_l - 1 / (2 beta))^2, with n clamped to >= 1.
    Paper: "A General Theoretical Paradigm to Understand Learning from Human Preferences" (arXiv 2310.12036).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference.
      chosen_lengths, rejected_lengths: [B] completion token counts n_w, n_l.
      beta: IPO's tau (default 0.1; the target per-token log-ratio margin is 1 / (2 beta)).
      f_divergence, f_alpha: as in :func:`dpo`.

    Returns:
      [B] per-example losses, float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> chosen, rejected = jnp.array([-5.0, -7.0]), jnp.array([-9.0, -6.0])
      >>> ref_chosen, ref_rejected = jnp.array([-6.0, -7.0]), jnp.array([-8.0, -6.0])
      >>> lengths = jnp.array([2, 4])
      >>> loss = ipo(chosen, rejected, ref_chosen, ref_rejected, lengths, lengths, beta=0.5)
      >>> print(np.asarray(loss, float).round(4))
      [0. 1.]
    """
    check_vectors(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, chosen_logps=chosen_logps)
    c, d = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence, f_alpha)
    return (c / clamp_lengths(chosen_lengths) - d / clamp_lengths(rejected_lengths) - 1.0 / (2.0 * beta)) ** 2


@register("exo", family="pairwise", aliases=("exo_pair",))
def exo(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array, *,
        beta: float = 0.1, label_smoothing: float = 1e-3, f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5) -> Array:
    """EXO for pairs (TRL ``exo_pair``): reverse KL between the model's and the smoothed label distribution.

    Formula: z = beta (c - d);  loss = s(z) [ls(z) - log(1 - eps)] + s(-z) [ls(-z) - log eps].
    Paper: "Towards Efficient Exact Optimization of Language Model Alignment" (arXiv 2402.00856), Eq. 16.

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: inverse temperature (default 0.1).
      label_smoothing: eps in (0, 1) (default 1e-3; log eps is undefined at 0: TRL's default of 0
        would give inf/NaN, so it raises here instead).
      f_divergence, f_alpha: the transform g of the log-ratios, as in :func:`dpo`.

    Returns:
      [B] per-example losses, float32.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"exo_pair needs label_smoothing in (0, 1) (it uses log eps); got {label_smoothing!r}")
    c, d = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence, f_alpha)
    z = beta * (c - d)
    eps = label_smoothing
    return (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(eps)))


@register("nca", family="pairwise", aliases=("nca_pair",))
def nca(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array, *,
        beta: float = 0.1) -> Array:
    """NCA for pairs (TRL ``nca_pair``): absolute (not relative) likelihood of each response.

    Formula: loss = -ls(beta u_w) - 0.5 ls(-beta u_w) - 0.5 ls(-beta u_l)   (raw log-ratios u).
    No f-divergence option: TRL 1.16 builds this loss from the raw log-ratios and refuses any other
    ``f_divergence_type`` for it.
    Paper: "Noise Contrastive Alignment of Language Models with Explicit Rewards" (arXiv 2402.05369).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: inverse temperature (default 0.1).

    Returns:
      [B] per-example losses, float32.
    """
    uw, ul = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    ls = jax.nn.log_sigmoid
    return -ls(beta * uw) - 0.5 * ls(-beta * uw) - 0.5 * ls(-beta * ul)


@register("robust_dpo", family="pairwise", aliases=("robust",))
def robust_dpo(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
               *, beta: float = 0.1, label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
               f_alpha: float = 0.5) -> Array:
    """Robust DPO (TRL ``robust``): unbiased loss under label-flip noise of rate eps.

    Formula: z = beta (c - d);  loss = [-(1 - eps) ls(z) + eps ls(-z)] / (1 - 2 eps).
    Paper: "Provably Robust DPO: Aligning Language Models with Noisy Feedback" (arXiv 2403.00409).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: inverse temperature (default 0.1).
      label_smoothing: eps, the label-flip rate, in [0, 0.5) (default 0.0).
      f_divergence, f_alpha: the transform g of the log-ratios, as in :func:`dpo`.

    Returns:
      [B] per-example losses, float32.
    """
    check_probability("label_smoothing", label_smoothing, high=0.5, high_open=True)
    c, d = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence, f_alpha)
    z = beta * (c - d)
    eps = label_smoothing
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


@register("bco_pair", family="pairwise")
def bco_pair(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
             *, beta: float = 0.1) -> Array:
    """BCO on pairs (TRL ``bco_pair``), without the running reward shift.

    Formula: loss = -ls(beta u_w) - ls(-beta u_l)   (raw log-ratios u; no f-divergence option, as TRL 1.16).
    Paper: "Binary Classifier Optimization for Large Language Model Alignment" (arXiv 2404.04656).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: inverse temperature (default 0.1).

    Returns:
      [B] per-example losses, float32.
    """
    uw, ul = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -jax.nn.log_sigmoid(beta * uw) - jax.nn.log_sigmoid(-beta * ul)


@register("sppo_hard", family="pairwise")
def sppo_hard(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
              *, beta: float = 0.1) -> Array:
    """SPPO with hard win probabilities (TRL ``sppo_hard``: P = 1 for the winner, 0 for the loser).

    Formula: loss = (u_w - 1 / (2 beta))^2 + (u_l + 1 / (2 beta))^2   (raw log-ratios u; no f-divergence
    option, as TRL 1.16).
    Paper: "Self-Play Preference Optimization for Language Model Alignment" (arXiv 2405.00675).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: default 0.1 (SPPO's eta = 1 / beta).

    Returns:
      [B] per-example losses, float32.
    """
    uw, ul = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (uw - 0.5 / beta) ** 2 + (ul + 0.5 / beta) ** 2


@register("aot", family="pairwise")
def aot(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array, *,
        beta: float = 0.1, label_smoothing: float = 0.0) -> Array:
    """AOT, paired (TRL ``aot``): distributional alignment by sorting over the batch.

    Formula: delta = sort_B(S_w - S_l) - sort_B(R_w - R_l);
      loss = -(1 - eps) ls(beta delta) - eps ls(-beta delta).
    Paper: "Distributional Preference Alignment of LLMs via Optimal Transport" (arXiv 2406.05882).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: inverse temperature (default 0.1).
      label_smoothing: eps in [0, 1] (default 0.0).

    Returns:
      [B] float32; entry i is the i-th order statistic's loss (not example i's): the loss
      couples the batch, so under data parallelism it sorts only the local shard unless the caller
      gathers.
    """
    check_probability("label_smoothing", label_smoothing)
    check_vectors(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                  ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    sw, sl, rw, rl = as_f32(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta = jnp.sort(sw - sl) - jnp.sort(rw - rl)
    return smoothed_sigmoid(beta * delta, label_smoothing)


@register("aot_unpaired", family="pairwise")
def aot_unpaired(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array,
                 ref_rejected_logps: Array, *, beta: float = 0.1, label_smoothing: float = 0.0) -> Array:
    """AOT, unpaired (TRL ``aot_unpaired``): sorts chosen and rejected log-ratios separately.

    Formula: delta = sort_B(u_w) - sort_B(u_l);  loss = -(1 - eps) ls(beta delta) - eps ls(-beta delta).
    Paper: "Distributional Preference Alignment of LLMs via Optimal Transport" (arXiv 2406.05882).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: inverse temperature (default 0.1).
      label_smoothing: eps in [0, 1] (default 0.0).

    Returns:
      [B] float32 order-statistic losses (see :func:`aot`).
    """
    check_probability("label_smoothing", label_smoothing)
    check_vectors(chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                  ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    sw, sl, rw, rl = as_f32(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta = jnp.sort(sw - rw) - jnp.sort(sl - rl)
    return smoothed_sigmoid(beta * delta, label_smoothing)


@register("apo_zero", family="pairwise")
def apo_zero(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
             *, beta: float = 0.1) -> Array:
    """APO-zero (TRL ``apo_zero``): raise the chosen likelihood, lower the rejected one.

    Formula: loss = 1 - s(beta u_w) + s(beta u_l)   (raw log-ratios u, as TRL).
    Paper: "Anchored Preference Optimization and Contrastive Revisions" (arXiv 2408.06266), Eq. 7.

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: inverse temperature (default 0.1).

    Returns:
      [B] per-example losses, float32.
    """
    uw, ul = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return 1.0 - jax.nn.sigmoid(beta * uw) + jax.nn.sigmoid(beta * ul)


@register("apo_down", family="pairwise")
def apo_down(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
             *, beta: float = 0.1) -> Array:
    """APO-down (TRL ``apo_down``): lower both likelihoods, the rejected one more.

    Formula: loss = s(beta u_w) + 1 - s(beta (u_w - u_l))   (raw log-ratios u in both terms; no
    f-divergence option, as TRL 1.16).
    Paper: "Anchored Preference Optimization and Contrastive Revisions" (arXiv 2408.06266), Eq. 8.

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: inverse temperature (default 0.1).

    Returns:
      [B] per-example losses, float32.
    """
    uw, ul = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return jax.nn.sigmoid(beta * uw) + 1.0 - jax.nn.sigmoid(beta * (uw - ul))


@register("discopop", family="pairwise")
def discopop(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
             *, beta: float = 0.1, tau: float = 0.05, f_divergence: str = "reverse_kl",
             f_alpha: float = 0.5) -> Array:
    """DiscoPOP (TRL ``discopop``): log-ratio-modulated blend of logistic and exponential losses.

    Formula: z = beta (c - d), m = s(z / tau);  loss = (1 - m)(-ls(z)) + m exp(-z).
    m exp(-z) is computed as exp(ls(z / tau) - z) so that it stays finite when z is very negative.
    Paper: "Discovering Preference Optimization Algorithms with and for Large Language Models"
    (arXiv 2406.08414).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: inverse temperature (default 0.1).
      tau: the blend's temperature (default 0.05; TRL ``discopop_tau``).
      f_divergence, f_alpha: the transform g of the log-ratios, as in :func:`dpo`.

    Returns:
      [B] per-example losses, float32.
    """
    c, d = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence, f_alpha)
    z = beta * (c - d)
    m = jax.nn.sigmoid(z / tau)
    exp_term = jnp.exp(jnp.minimum(jax.nn.log_sigmoid(z / tau) - z, EXP_CAP))
    return (1.0 - m) * (-jax.nn.log_sigmoid(z)) + exp_term


@register("ln_dpo", family="pairwise", aliases=("sigmoid_norm",))
def ln_dpo(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
           chosen_lengths: Array, rejected_lengths: Array, *, beta: float = 0.1,
           f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Array:
    """Length-normalised DPO (TRL ``sigmoid_norm``): DPO on per-token (mean) log-ratios.

    Formula: loss = -ls(beta (c / n_w - d / n_l)), n clamped to >= 1.
    Source: TRL's ``sigmoid_norm`` loss type (no paper of its own); DPO (arXiv 2305.18290) with the
    log-ratios divided by the completion length, the normalisation SimPO applies to its reference-free
    reward ("SimPO: Simple Preference Optimization with a Reference-Free Reward", arXiv 2405.14734). Not
    R-DPO ("Disentangling Length from Quality in Direct Preference Optimization", arXiv 2403.19159),
    which keeps summed log-ratios and adds a length penalty alpha (|y_w| - |y_l|) to the logit instead.

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      chosen_lengths, rejected_lengths: [B] completion token counts n_w, n_l.
      beta: inverse temperature (default 0.1).
      f_divergence, f_alpha: the transform g of the log-ratios, as in :func:`dpo`.

    Returns:
      [B] per-example losses, float32.
    """
    check_vectors(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, chosen_logps=chosen_logps)
    c, d = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       f_divergence, f_alpha)
    x = c / clamp_lengths(chosen_lengths) - d / clamp_lengths(rejected_lengths)
    return -jax.nn.log_sigmoid(beta * x)


# ----------------------------------------------------------------------------- further pairwise objectives


@register("dpo_split_beta", family="pairwise", reward_scale=lambda h: h["beta_chosen"])
def dpo_split_beta(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array,
                   ref_rejected_logps: Array, *, beta_chosen: float = 0.1,
                   beta_rejected: float = 0.05) -> Array:
    """DPO with separate betas for the chosen and rejected log-ratios.

    Formula: loss = -ls(beta_w u_w - beta_l u_l). beta_w = beta_l recovers DPO. A smaller beta_l slows
    the rejected-likelihood collapse the paper analyses.
    Paper: "3D-Properties: Identifying Challenges in DPO and Charting a Path Forward" (arXiv 2406.07327).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta_chosen: beta_w (default 0.1).
      beta_rejected: beta_l (default 0.05).

    Returns:
      [B] per-example losses, float32.
    """
    uw, ul = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -jax.nn.log_sigmoid(beta_chosen * uw - beta_rejected * ul)


@register("gamma_dpo", family="pairwise")
def gamma_dpo(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
              *, beta: float = 0.1, gamma: float = 0.5, ranking_margin: bool = False) -> Array:
    """DPO with a target reward margin gamma (the ranking-accuracy fix).

    Formula: z = beta (u_w - u_l);  loss = -ls(z - gamma_i), with
      gamma_i = gamma                                 (ranking_margin=False), or
      gamma_i = gamma + beta max(0, R_l - R_w)        (ranking_margin=True; the max is constant, no gradient).
    Why: the paper shows R = 1[pi(y_w) >= pi(y_l)] holds iff z >= beta (R_l - R_w), i.e. iff the DPO loss is
    below -ls(beta (R_l - R_w)): where the reference ranks y_l higher (R_l > R_w) DPO can reach a loss below
    log 2 while still ranking y_l first. Shifting z by the per-example bound beta (R_l - R_w)^+ (plus gamma)
    makes a loss below -ls(-gamma) imply a correct ranking. This is our reading (the paper diagnoses, it does
    not name a loss): gamma = 0 and ranking_margin=False recovers DPO.
    Paper: "Preference Learning Algorithms Do Not Learn Preference Rankings" (arXiv 2405.19534).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      beta: inverse temperature (default 0.1).
      gamma: the margin in units of z (default 0.5).
      ranking_margin: add the per-example bound beta max(0, R_l - R_w) (default False).

    Returns:
      [B] per-example losses, float32.
    """
    uw, ul = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    margin = jnp.asarray(gamma, jnp.float32)
    if ranking_margin:
        rw, rl = as_f32(ref_chosen_logps, ref_rejected_logps)
        margin = margin + beta * jax.lax.stop_gradient(jax.nn.relu(rl - rw))
    return -jax.nn.log_sigmoid(beta * (uw - ul) - margin)


@register("adpo", family="pairwise", aliases=("adpo_pair",), reward_scale=lambda h: 1.0 / h["tau"])
def adpo(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
         chosen_probs: Array | None = None, *, tau: float = 10.0) -> Array:
    """Anchored DPO, pairwise soft-target form.

    Formula: u = (S - A) / tau with anchor log-probs A;  loss = -[q ls(u_w - u_l) + (1 - q) ls(u_l - u_w)].
    q = 1, anchor = reference, tau = 1 / beta recovers DPO.
    The anchor comes in the reference slot (``ref_chosen_logps, ref_rejected_logps``): the trainer fills it
    with a frozen reference, a teacher, the old policy or an EMA, whichever reference it is configured with.
    Paper: ADPO, "Anchored Direct Preference Optimization" (objectives.md; soft targets, anchors).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the anchor's log-probs A_w, A_l.
      chosen_probs: [B] q in [0, 1], the target probability that y_w is preferred; None = 1 (hard
        labels).
      tau: temperature (default 10.0; 10 = 1 / beta for DPO's beta = 0.1).

    Returns:
      [B] per-example losses, float32.
    """
    check_vectors(chosen_logps=chosen_logps, chosen_probs=chosen_probs)
    uw, ul = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    x = (uw - ul) / tau
    if chosen_probs is None:
        return -jax.nn.log_sigmoid(x)
    (q,) = as_f32(chosen_probs)
    return -(q * jax.nn.log_sigmoid(x) + (1.0 - q) * jax.nn.log_sigmoid(-x))


def _fuse(source_logps: Array, pivot: Array, clip_to_pivot: str, weights: Array) -> Array:
    """sum_i gamma_i log Clip(M_i), on length-normalised log-probs [B, N] -> [B]."""
    if clip_to_pivot == "max":
        source_logps = jnp.maximum(source_logps, pivot[:, None])
    elif clip_to_pivot == "min":
        source_logps = jnp.minimum(source_logps, pivot[:, None])
    return jnp.sum(weights * source_logps, axis=-1)


@register("infifpo", family="pairwise")
def infifpo(chosen_logps: Array, rejected_logps: Array, chosen_lengths: Array, rejected_lengths: Array,
            source_chosen_logps: Array, source_rejected_logps: Array, *, beta: float = 0.1,
            fusion: str = "max_margin", clip: bool = True) -> Array:
    """InfiFPO: DPO whose reference is a fusion of N source models, on length-normalised log-probs.

    Formula: lbar = S / n (policy, "pivot");  lbar_i = source i's length-normalised log-prob (given);
      log Clip(M_i(y_w)) = max(lbar_i(y_w), sg(lbar(y_w))),
      log Clip(M_i(y_l)) = min(lbar_i(y_l), sg(lbar(y_l)))
        (clip=True: a source never pulls the reference below the pivot on y_w nor above it on y_l, so a weak
        source cannot turn the implicit reward against the preference; sg = stop-gradient);
      lbar_fu(y) = sum_i gamma_i log Clip(M_i(y)), gamma = 1/N ("mean") or one-hot on the source whose
        |lbar_i(y_w) - lbar(y_w)| + |lbar_i(y_l) - lbar(y_l)| is largest ("max_margin", per example);
      loss = -ls(beta [lbar(y_w) - lbar_fu(y_w)] - beta [lbar(y_l) - lbar_fu(y_l)]).
    With one source and clip=False this is DPO on length-normalised log-probs.
    Paper: "InfiFPO: Implicit Model Fusion via Preference Optimization in Large Language Models"
    (arXiv 2505.13878).

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs.
      chosen_lengths, rejected_lengths: [B] completion token counts n_w, n_l.
      source_chosen_logps, source_rejected_logps: [B, N] each source's log-probs, already
        length-normalised per source (sources may use other tokenizers, so each source normalises by
        its own token count; the ``source_logps`` job computes them, ``experiments/source_logps.py``).
      beta: inverse temperature (default 0.1).
      fusion: "mean" or "max_margin" (default).
      clip: clip each source to the pivot (default True).

    Returns:
      [B] per-example losses, float32.
    """
    check_vectors(chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_lengths=chosen_lengths,
                  rejected_lengths=rejected_lengths)
    chex.assert_rank([source_chosen_logps, source_rejected_logps], 2)
    chex.assert_equal_shape([source_chosen_logps, source_rejected_logps])
    chex.assert_equal(source_chosen_logps.shape[0], chosen_logps.shape[0])
    sw, sl, qw, ql = as_f32(chosen_logps, rejected_logps, source_chosen_logps, source_rejected_logps)
    lw, ll = sw / clamp_lengths(chosen_lengths), sl / clamp_lengths(rejected_lengths)
    pw, pl = jax.lax.stop_gradient(lw), jax.lax.stop_gradient(ll)
    n = qw.shape[-1]
    if fusion == "mean":
        weights = jnp.full(qw.shape, 1.0 / n, jnp.float32)
    elif fusion == "max_margin":
        divergence = jnp.abs(qw - pw[:, None]) + jnp.abs(ql - pl[:, None])
        weights = jax.nn.one_hot(jnp.argmax(divergence, axis=-1), n, dtype=jnp.float32)
    else:
        raise ValueError(f"infifpo fusion must be 'mean' or 'max_margin'; got {fusion!r}")
    fw = _fuse(qw, pw, "max" if clip else "none", weights)
    fl = _fuse(ql, pl, "min" if clip else "none", weights)
    return -jax.nn.log_sigmoid(beta * (lw - fw) - beta * (ll - fl))


@register("gpo_square", family="pairwise")
def gpo_square(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array,
               chosen_win_probs: Array, rejected_win_probs: Array, *, beta: float = 0.1) -> Array:
    """GPO: SPPO's square loss with per-response win probabilities against the current policy.

    Formula: loss = (u_w - (P_w - 1/2) / beta)^2 + (u_l - (P_l - 1/2) / beta)^2, with
      P_w = P(y_w > pi_t), P_l = P(y_l > pi_t): each response's probability of beating the current policy,
      estimated from GPM scores against K policy samples (``gpm_win_probability``). They are two inputs that
      need not sum to one (a pair where both responses beat the policy has P_w, P_l > 1/2). The step reads
      them from each record's ``chosen_probs_win`` / ``chosen_probs_lose`` (SPPO's and GPO's data columns).
    P_w = 1, P_l = 0 recovers ``sppo_hard``. The probabilities are constants here (no gradient).
    Paper: "Beyond Bradley-Terry Models: A General Preference Model for Language Model Alignment"
    (arXiv 2410.02197); the square loss is SPPO's (arXiv 2405.00675, Eq. 4.7) with eta = 1 / beta.

    Args:
      chosen_logps, rejected_logps: [B] summed policy log-probs S_w, S_l.
      ref_chosen_logps, ref_rejected_logps: [B] the same under the reference, R_w, R_l.
      chosen_win_probs, rejected_win_probs: [B] P_w, P_l in [0, 1].
      beta: default 0.1 (SPPO's eta = 1 / beta).

    Returns:
      [B] per-example losses, float32.
    """
    check_vectors(chosen_logps=chosen_logps, chosen_win_probs=chosen_win_probs,
                  rejected_win_probs=rejected_win_probs)
    uw, ul = pair_scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    pw, pl = jax.lax.stop_gradient(as_f32(chosen_win_probs, rejected_win_probs))
    return (uw - (pw - 0.5) / beta) ** 2 + (ul - (pl - 0.5) / beta) ** 2


def gpm_win_probability(scores: Array, *, tau: float = 0.1, mask: Array | None = None) -> Array:
    """P(y > pi_t) estimated from GPM scores s(y > y_k) against K policy samples: mean_k s(score_k / tau).

    Args:
      scores: [B, K] GPM scores of the response against each of K samples
        (``reward.gpm_score``).
      tau: the GPM temperature (default 0.1).
      mask: optional [B, K], 1 = a real sample.

    Returns:
      [B] float32 probabilities.
    """
    chex.assert_rank(scores, 2)
    (z,) = as_f32(scores)
    p = jax.nn.sigmoid(z / tau)
    if mask is None:
        return jnp.mean(p, axis=-1)
    (m,) = as_f32(mask)
    return jnp.sum(p * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
