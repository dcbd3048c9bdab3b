"""Modifiers: wrap any loss into a new loss with extra inputs, extra terms or per-example weights.

Design. A modifier takes a loss function and returns a new loss function whose *signature* is the base
signature plus the modifier's extra array inputs (ordinary parameters) and hyperparameters (keyword-only).
So the registry derives ``spec(name).required`` from the composite exactly as from a plain loss, and the
trainer stays declarative: it computes the arrays the composite names and calls it with keywords.

    rpo = with_nll(dpo)                    # inputs: the 4 DPO log-probs + chosen_lengths; hyper nll_weight
    ld = length_desensitized(simpo)        # summed log-probs replaced by token log-probs + masks
    wpo_ipo = with_wpo_weights(ipo)        # adds chosen_wpo_logps, rejected_wpo_logps

Modifiers compose (``with_nll(with_wpo_weights(dpo))``); the weight modifiers scale the base loss only,
so apply them innermost when an added term should stay unweighted. Two modifiers may not add the same
hyperparameter name (a clear error says which). Shared array inputs (e.g. ``chosen_lengths``) are merged.

Extra array names (the trainer computes them; shapes per example):
  chosen_lengths [B]                         -- token count of y_w (NLL modifier)
  chosen_wpo_logps, rejected_wpo_logps [B]   -- WPO's mean aligned token log-prob (``wpo_aligned_logps``)
  chosen_token_logps, rejected_token_logps,
  ref_chosen_token_logps, ref_rejected_token_logps [B, T], chosen_mask, rejected_mask [B, T]  -- LD-DPO
  semantic_distance [B]                      -- cosine distance d_cos(e(x), e(y_w)) (``cosine_distance``)
  rationale_logps [B]                        -- log pi(rationale | prompt, y_w, y_l), summed over its tokens
  degree_logits [B, D], degree_labels [B]    -- SPO's preference-degree classifier
  chosen_instruction_logps, rejected_instruction_logps (+ ref_*) [B]  -- DOVE's log pi(I)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from alignjax.losses.pairwise import as_f32, check_vectors, completion_nll, dpo
from alignjax.losses.registry import register

Array = jax.Array
LossFn = Callable[..., Array]
_P = inspect.Parameter


def extend_loss(base: LossFn, combine: Callable[[Callable[..., Array], dict], Array], *, name: str, doc: str,
                extra_inputs: tuple[str, ...] = (), extra_hyper: dict[str, object] | None = None,
                drop_inputs: tuple[str, ...] = ()) -> LossFn:
    """Builds a new loss from ``base``: signature = base arrays - ``drop_inputs`` + ``extra_inputs``,
    base hyperparameters + ``extra_hyper``. ``combine(call_base, values)`` gets a function that calls the
    base loss (``call_base(**array_overrides)``, e.g. to pass transformed log-probs) and all argument values.
    """
    extra_hyper = dict(extra_hyper or {})
    params = list(inspect.signature(base).parameters.values())
    arrays = [p for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]
    hypers = [p for p in params if p.kind is _P.KEYWORD_ONLY]
    clash = sorted(set(extra_hyper) & {p.name for p in hypers})
    if clash:
        raise ValueError(f"{name}: hyperparameter(s) {clash} already exist in {base.__name__}; "
                         "a modifier cannot be applied twice to the same loss")
    required = [p.name for p in arrays if p.default is p.empty and p.name not in drop_inputs]
    optional = [p for p in arrays if p.default is not p.empty and p.name not in drop_inputs]
    for n in extra_inputs:
        if n not in required:
            required.append(n)
    optional = [p for p in optional if p.name not in required]
    sig = inspect.Signature(
        [_P(n, _P.POSITIONAL_OR_KEYWORD) for n in required]
        + [_P(p.name, _P.POSITIONAL_OR_KEYWORD, default=p.default) for p in optional]
        + [_P(p.name, _P.KEYWORD_ONLY, default=p.default) for p in hypers]
        + [_P(k, _P.KEYWORD_ONLY, default=v) for k, v in extra_hyper.items()])
    base_arrays = [p.name for p in arrays]
    base_hypers = [p.name for p in hypers]

    def loss(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)

        def call_base(**overrides):
            kw = {k: values[k] for k in base_arrays if k in values}
            kw.update(overrides)
            kw.update({k: values[k] for k in base_hypers})
            return base(**kw)

        return combine(call_base, values)

    loss.__signature__ = sig
    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = f"{doc.strip()}\n\nBase loss ``{base.__name__}``:\n{inspect.getdoc(base) or ''}"
    return loss


# ----------------------------------------------------------------------------- NLL (RPO / CPO / SPaR "sft")


def with_nll(base: LossFn, *, weight: float = 1.0, name: str | None = None) -> LossFn:
    """Adds ``nll_weight * NLL(y_w)`` (RPO: "Iterative Reasoning Preference Optimization", arXiv 2404.19733;
    also the 3D-properties mitigation L_DPO + lambda NLL(y_w)). Extra input ``chosen_lengths``; hypers
    ``nll_weight`` (default ``weight``) and ``nll_reduction`` (:func:`completion_nll`)."""
    return extend_loss(
        base, lambda call, v: call() + v["nll_weight"] * completion_nll(
            v["chosen_logps"], v["chosen_lengths"], v["nll_reduction"]),
        name=name or f"{base.__name__}_nll", extra_inputs=("chosen_logps", "chosen_lengths"),
        extra_hyper={"nll_weight": weight, "nll_reduction": "sequence"},
        doc=f"{base.__name__} + nll_weight * NLL(y_w): nll_reduction 'sequence' = -S_w / n_w per example\n"
            "(RPO's per-token mean, n >= 1) or 'tokens' = TRL's mean over every chosen token of the batch.\n"
            "Paper: \"Iterative Reasoning Preference Optimization\" (arXiv 2404.19733).\n"
            f"Extra inputs: chosen_lengths [B]. Hyperparameters: nll_weight = {weight}, nll_reduction = "
            "'sequence'.")


# ----------------------------------------------------------------------------- WPO


def log_sum_sq_probs(logits: Array) -> Array:
    """log sum_v p_v^2 per position, from logits [..., V] -> [...] (fp32): logsumexp(2z) - 2 logsumexp(z)."""
    (z,) = as_f32(logits)
    return jax.nn.logsumexp(2.0 * z, axis=-1) - 2.0 * jax.nn.logsumexp(z, axis=-1)


def wpo_aligned_logps(token_logps: Array, token_log_sum_sq_probs: Array, mask: Array) -> Array:
    """WPO's per-sequence weight exponent: mean over tokens of (log p_t - log sum_v p_v^2), [B, T] -> [B].

    exp() of it is the sampling-probability weight of "WPO: Enhancing RLHF with Weighted Preference
    Optimization" (arXiv 2406.11827), Eq. 2 (TRL ``use_weighting``). The trainer computes it for y_w and y_l.
    """
    chex.assert_rank([token_logps, token_log_sum_sq_probs, mask], 2)
    lp, lq, m = as_f32(token_logps, token_log_sum_sq_probs, mask)
    return jnp.sum((lp - lq) * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def with_wpo_weights(base: LossFn, *, name: str | None = None) -> LossFn:
    """Multiplies the base loss by min(1, w_w w_l), w = exp(sg(wpo_aligned_logps)) (WPO, arXiv 2406.11827).

    The clamp at 1 is the official code's (wzhouad/WPO scripts/run_wpo.py, ``get_batch_logps``): the
    aligned log-prob of a token likelier than sum_v p_v^2 is positive, and the clamp keeps such pairs from
    outweighing on-policy ones. TRL 1.16's ``use_weighting`` does not clamp; alignjax follows the authors.
    """

    def combine(call, v):
        cw, cl = as_f32(v["chosen_wpo_logps"], v["rejected_wpo_logps"])
        check_vectors(chosen_wpo_logps=cw, rejected_wpo_logps=cl)
        return call() * jax.lax.stop_gradient(jnp.exp(jnp.minimum(cw + cl, 0.0)))

    return extend_loss(
        base, combine, name=name or f"{base.__name__}_wpo",
        extra_inputs=("chosen_wpo_logps", "rejected_wpo_logps"),
        doc=f"{base.__name__} weighted per example by min(1, exp(a_w) exp(a_l)) (no gradient through the\n"
            "weight; clamped at 1 as the official code), a = mean_t(log p_t - log sum_v p_v^2) from\n"
            "``wpo_aligned_logps``.\n"
            "Paper: \"WPO: Enhancing RLHF with Weighted Preference Optimization\" (arXiv 2406.11827).\n"
            "Extra inputs: chosen_wpo_logps, rejected_wpo_logps [B].")


# ----------------------------------------------------------------------------- LD-DPO


def ld_logps(token_logps: Array, mask: Array, other_mask: Array, *, alpha: float) -> Array:
    """Length-desensitised sequence log-prob [B]: the first min(n, n_other) completion tokens count fully,
    the tokens beyond (the "excess" of the longer response) are scaled by alpha.

    Formula: l = sum_{t <= min(n_w, n_l)} log p_t + alpha sum_{t > min(n_w, n_l)} log p_t, counting completion
    tokens in order (mask = 1). Shapes: token_logps, mask, other_mask [B, T] (other_mask may have another T).
    """
    chex.assert_rank([token_logps, mask, other_mask], 2)
    chex.assert_equal_shape([token_logps, mask])
    lp, m, om = as_f32(token_logps, mask, other_mask)
    shared = jnp.minimum(jnp.sum(m, axis=-1), jnp.sum(om, axis=-1))[:, None]
    pos = jnp.cumsum(m, axis=-1)
    shared_mask = m * (pos <= shared)
    tail_mask = m * (pos > shared)
    return jnp.sum(lp * shared_mask, axis=-1) + alpha * jnp.sum(lp * tail_mask, axis=-1)


_LD_SUMMED = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def length_desensitized(base: LossFn, *, alpha: float = 0.5, name: str | None = None) -> LossFn:
    """LD-DPO: replaces the base loss's summed log-probs by length-desensitised ones (``ld_logps``).

    The summed inputs are dropped from the signature; token-level inputs take their place
    (``ref_*_token_logps`` only when the base uses a reference). Lengths the base needs stay inputs.
    """
    base_inputs = list(inspect.signature(base).parameters)
    uses_ref = "ref_chosen_logps" in base_inputs
    extra = ["chosen_token_logps", "rejected_token_logps", "chosen_mask", "rejected_mask"]
    if uses_ref:
        extra[2:2] = ["ref_chosen_token_logps", "ref_rejected_token_logps"]

    def combine(call, v):
        a = v["ld_alpha"]
        cm, rm = v["chosen_mask"], v["rejected_mask"]
        new = {"chosen_logps": ld_logps(v["chosen_token_logps"], cm, rm, alpha=a),
               "rejected_logps": ld_logps(v["rejected_token_logps"], rm, cm, alpha=a)}
        if uses_ref:
            new["ref_chosen_logps"] = ld_logps(v["ref_chosen_token_logps"], cm, rm, alpha=a)
            new["ref_rejected_logps"] = ld_logps(v["ref_rejected_token_logps"], rm, cm, alpha=a)
        return call(**new)

    return extend_loss(
        base, combine, name=name or f"ld_{base.__name__}", extra_inputs=tuple(extra),
        drop_inputs=tuple(n for n in _LD_SUMMED if n in base_inputs), extra_hyper={"ld_alpha": alpha},
        doc=f"{base.__name__} on length-desensitised log-probs: l = sum_(t <= min(n_w, n_l)) log p_t\n"
            "+ ld_alpha * sum_(t > min(n_w, n_l)) log p_t, for policy and reference alike\n"
            "(ld_alpha = 1: the base).\n"
            "Paper: \"Length Desensitization in Directed Preference Optimization\" (arXiv 2409.06411).\n"
            "Extra inputs: token log-probs [B, T] and completion masks [B, T].\n"
            f"Hyperparameters: ld_alpha = {alpha}.")


# ----------------------------------------------------------------------------- Sem-DPO


def cosine_distance(a: Array, b: Array) -> Array:
    """1 - cos(a, b) over the last axis, [B, E] x [B, E] -> [B] (fp32)."""
    a, b = as_f32(a, b)
    num = jnp.sum(a * b, axis=-1)
    den = jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
    return 1.0 - num / den


def with_semantic_weight(base: LossFn, *, alpha: float = 1.0, name: str | None = None) -> LossFn:
    """Sem-DPO: multiplies the base loss by W = exp(-sem_alpha d_cos(e(x), e(y_w)))."""

    def combine(call, v):
        (d,) = as_f32(v["semantic_distance"])
        return call() * jax.lax.stop_gradient(jnp.exp(-v["sem_alpha"] * d))

    return extend_loss(
        base, combine, name=name or f"sem_{base.__name__}", extra_inputs=("semantic_distance",),
        extra_hyper={"sem_alpha": alpha},
        doc=f"{base.__name__} weighted per example by W = exp(-sem_alpha d_cos(e(x), e(y_w))),\n"
            "d_cos = 1 - cos of sentence embeddings (``cosine_distance``), so pairs whose preferred output\n"
            "drifts semantically from the input count less (no gradient through W).\n"
            "Paper: \"Sem-DPO: Mitigating Semantic Inconsistency in Preference Optimization for Prompt\n"
            "Engineering\". Extra inputs: semantic_distance [B], a data column: the paper computes it\n"
            "offline from sentence embeddings and supplying it per record is the contract (the step\n"
            "does not embed).\n"
            f"Hyperparameters: sem_alpha = {alpha}.")


# ----------------------------------------------------------------------------- rationales


def with_rationale(base: LossFn, *, gamma: float = 0.1, name: str | None = None) -> LossFn:
    """Subtracts rationale_gamma * log pi(rationale | prompt, y_w, y_l): a plain supervised term."""

    def combine(call, v):
        (r,) = as_f32(v["rationale_logps"])
        return call() - v["rationale_gamma"] * r

    return extend_loss(
        base, combine, name=name or f"{base.__name__}_rationale", extra_inputs=("rationale_logps",),
        extra_hyper={"rationale_gamma": gamma},
        doc=f"{base.__name__} - rationale_gamma * log pi(r | x, y_w, y_l), r = a rationale for the\n"
            "preference: the rationale's negative log-likelihood, weighted, added to the preference loss\n"
            "(a supervised term, not a log-sigmoid of it).\n"
            "Paper: \"Data-Centric Human Preference Optimization with Rationales\" (arXiv 2407.14477).\n"
            f"Extra inputs: rationale_logps [B] (summed). Hyperparameters: rationale_gamma = {gamma}.")


# ----------------------------------------------------------------------------- SPO preference degree


def degree_cross_entropy(degree_logits: Array, degree_labels: Array) -> Array:
    """Cross-entropy of the preference-degree classifier, fp32: logits [B, C] with int labels [B], or
    [B, M, C] with [B, M] (M degraded responses per pair, averaged) -> [B]."""
    chex.assert_rank(degree_labels, degree_logits.ndim - 1)
    if degree_logits.ndim not in (2, 3):
        raise ValueError(f"degree_logits must be [B, C] or [B, M, C], got shape {degree_logits.shape}")
    (z,) = as_f32(degree_logits)
    logp = jax.nn.log_softmax(z, axis=-1)
    labels = jnp.asarray(degree_labels, jnp.int32)[..., None]
    ce = -jnp.take_along_axis(logp, labels, axis=-1)[..., 0]
    return ce if ce.ndim == 1 else jnp.mean(ce, axis=-1)


def with_degree_ce(base: LossFn, *, weight: float = 0.1, name: str | None = None) -> LossFn:
    """SPO: adds degree_weight * CE(degree_logits, degree_labels)."""
    return extend_loss(
        base, lambda call, v: call() + v["degree_weight"] * degree_cross_entropy(v["degree_logits"],
                                                                                 v["degree_labels"]),
        name=name or f"{base.__name__}_spo", extra_inputs=("degree_logits", "degree_labels"),
        extra_hyper={"degree_weight": weight},
        doc=f"{base.__name__} + degree_weight * CE(degree): SPO's self-supervised preference-degree loss,\n"
            "L = L_align + lambda CE(degree). An auxiliary classifier on the policy predicts, for the\n"
            "chosen and the rejected response with part of their key content (RAKE phrases) removed,\n"
            "which side each came from and how much was removed (alignjax.data.degrees).\n"
            "Paper: \"Self-supervised Preference Optimization: Enhance Your Language Model with\n"
            "Preference Degree Awareness\" (arXiv 2409.17791).\n"
            "Extra inputs: degree_logits [B, M, C] (or [B, C]), degree_labels [B, M] (or [B]) int.\n"
            f"Hyperparameters: degree_weight = lambda = {weight} (our default; the paper tunes it).")


# ----------------------------------------------------------------------------- DOVE joint preference


def joint(chosen_logps: Array, rejected_logps: Array, chosen_instruction_logps: Array,
          rejected_instruction_logps: Array, ref_chosen_logps: Array | None = None,
          ref_rejected_logps: Array | None = None, ref_chosen_instruction_logps: Array | None = None,
          ref_rejected_instruction_logps: Array | None = None) -> dict[str, Array]:
    """Joint log-probs of (instruction, response): l(I, R) = log pi(I) + log pi(R | I).

    Returns the keyword arrays of a pairwise loss, so DOVE is ``dpo(**joint(...))``. Reference entries
    are included when given. Paper: "Comparing Bad Apples to Good Oranges: Aligning Large Language Models
    via Joint Preference Optimization" (arXiv 2404.00530).
    """
    out = {"chosen_logps": chosen_logps + chosen_instruction_logps,
           "rejected_logps": rejected_logps + rejected_instruction_logps}
    if ref_chosen_logps is not None:
        out["ref_chosen_logps"] = ref_chosen_logps + ref_chosen_instruction_logps
        out["ref_rejected_logps"] = ref_rejected_logps + ref_rejected_instruction_logps
    return out


def joint_preference(base: LossFn, *, name: str | None = None) -> LossFn:
    """DOVE: the base loss on joint (instruction + response) log-probs; instructions may differ."""
    uses_ref = "ref_chosen_logps" in inspect.signature(base).parameters
    extra = ["chosen_instruction_logps", "rejected_instruction_logps"]
    if uses_ref:
        extra += ["ref_chosen_instruction_logps", "ref_rejected_instruction_logps"]

    def combine(call, v):
        return call(**joint(**{k: v[k] for k in (*_LD_SUMMED[: 4 if uses_ref else 2], *extra)}))

    return extend_loss(
        base, combine, name=name or f"joint_{base.__name__}", extra_inputs=tuple(extra),
        doc=f"{base.__name__} on joint log-probs l(I, R) = log pi(I) + log pi(R | I) (and the same under\n"
            "the reference); equals the base loss when I_w = I_l. Paper: \"Comparing Bad Apples to Good\n"
            "Oranges: Aligning Large Language Models via Joint Preference Optimization\"\n"
            "(arXiv 2404.00530). Extra inputs: chosen_instruction_logps, rejected_instruction_logps\n"
            "(+ ref_*) [B], summed over I.")


# ----------------------------------------------------------------------------- registered composites

rpo = register("rpo", family="pairwise")(with_nll(dpo, weight=1.0, name="rpo"))
spar = register("spar", family="pairwise")(with_nll(dpo, weight=0.1, name="spar"))
wpo = register("wpo", family="pairwise")(with_wpo_weights(dpo, name="wpo"))
ld_dpo = register("ld_dpo", family="pairwise")(length_desensitized(dpo, name="ld_dpo"))
sem_dpo = register("sem_dpo", family="pairwise")(with_semantic_weight(dpo, name="sem_dpo"))
rationale_dpo = register("rationale_dpo", family="pairwise")(with_rationale(dpo, name="rationale_dpo"))
spo = register("spo", family="pairwise")(with_degree_ce(dpo, name="spo"))
dove = register("dove", family="pairwise")(joint_preference(dpo, name="dove"))
