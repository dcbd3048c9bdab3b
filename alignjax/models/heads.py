"""Heads on the shared decoder: reward models' value (BT, ensembles), GPM embedding and PAL ideal
point, and the policy's auxiliary classifiers (:class:`AuxHeads`, ``ModelConfig.aux_heads``).

A reward model is ``{"decoder": decoder params, "head": head params}``; the head reads the decoder's
final normed hidden state ``[R, T, D]`` (``Model.hidden``) at one token per sequence:

* :func:`last_token_index` finds each sequence's *last completion token* from ``loss_mask`` and
  ``example_ids`` (any layout: padded, packed, shared prompt). In the padded layout that is the last
  non-pad token, the token HF's ``*ForSequenceClassification`` pools (via ``pad_token_id``).
* :func:`prompt_token_index` finds the last prompt token (the token before the first completion
  token), where GPM's prompt-dependent scales are read.

Heads are small Flax modules whose params carry logical axis names (``embed`` for the model
dimension, ``value`` for head outputs: replicated by default). They take pooled features ``[N, D]``.
"""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
HEAD_KINDS = ("value", "gpm", "pal")


def _init(axes: tuple[str | None, ...], init=None):
    return nn.with_logical_partitioning(init or nn.initializers.normal(0.02), axes)


# ------------------------------------------------------------------------------------------ pooling


def _flat_index_reduce(loss_mask: Array, example_ids: Array, num_sequences: int, *, last: bool) -> Array:
    """Per sequence, the flat index ``row * T + t`` of its last (or first) loss-masked token."""
    chex.assert_rank([loss_mask, example_ids], 2)
    chex.assert_equal_shape([loss_mask, example_ids])
    r, t = example_ids.shape
    flat = jnp.arange(r * t, dtype=jnp.int32).reshape(r, t)
    ids = jnp.where(loss_mask > 0, example_ids, num_sequences).reshape(-1)  # masked -> dropped bin
    if last:
        out = jax.ops.segment_max(flat.reshape(-1), ids, num_segments=num_sequences + 1)
    else:
        out = jax.ops.segment_min(flat.reshape(-1), ids, num_segments=num_sequences + 1)
    # A sequence without completion tokens has no reward token: point at index 0 (its reward is then
    # meaningless, but such sequences are rejected by data validation before they get here).
    return jnp.clip(out[:num_sequences], 0, r * t - 1)


def last_token_index(loss_mask: Array, example_ids: Array, num_sequences: int) -> Array:
    """[N] flat indices (``row * T + t``) of each sequence's last completion token."""
    return _flat_index_reduce(loss_mask, example_ids, num_sequences, last=True)


def prompt_token_index(loss_mask: Array, example_ids: Array, num_sequences: int) -> Array:
    """[N] flat indices of the token just before each sequence's first completion token (the last
    prompt token; in the shared-prompt layout, the branch's copy of it)."""
    return jnp.maximum(_flat_index_reduce(loss_mask, example_ids, num_sequences, last=False) - 1, 0)


def mean_completion_state(
    hidden: Array, loss_mask: Array, example_ids: Array, num_sequences: int
) -> Array:
    """hidden [R, T, D] -> [N, D]: each sequence's mean hidden state over its completion tokens
    (fp32; any layout, as ``example_ids`` number the sequences)."""
    chex.assert_rank(hidden, 3)
    mask = (loss_mask > 0).reshape(-1)
    ids = jnp.where(mask, example_ids.reshape(-1), num_sequences)
    h = hidden.reshape(-1, hidden.shape[-1]).astype(jnp.float32)
    total = jax.ops.segment_sum(h, ids, num_segments=num_sequences + 1)[:num_sequences]
    count = jax.ops.segment_sum(mask.astype(jnp.float32), ids, num_segments=num_sequences + 1)
    return total / jnp.maximum(count[:num_sequences], 1.0)[:, None]


def gather_tokens(hidden: Array, flat_index: Array) -> Array:
    """hidden [R, T, D], flat indices [N] -> [N, D]."""
    chex.assert_rank(hidden, 3)
    return jnp.take(hidden.reshape(-1, hidden.shape[-1]), flat_index, axis=0)


# ------------------------------------------------------------------------------------------ heads


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """What sits on the decoder.

    kind: ``value`` (scalar reward per head; ``num_heads`` > 1 is an ensemble for preference strength),
      ``gpm`` (unit-norm preference embedding of dimension ``gpm_dim`` = 2k, optional prompt-dependent
      block scales; :class:`GPMHead`), ``pal`` (features of dimension ``pal_dim``, ``pal_prototypes``
      prototypes, ``pal_users`` users' mixture logits).
    """

    kind: str = "value"
    num_heads: int = 1
    gpm_dim: int = 2
    gpm_prompt_scales: bool = False
    gpm_normalize: bool = True
    pal_dim: int = 16
    pal_prototypes: int = 2
    pal_users: int = 1

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind {self.kind!r}; valid: {list(HEAD_KINDS)} (config.reward.head)")
        if self.gpm_dim < 2 or self.gpm_dim % 2:
            raise ValueError(
                f"gpm_dim must be even and >= 2 (2k), got {self.gpm_dim} (config.reward.gpm_dim)"
            )
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads} (config.reward.num_heads)")


class AuxHeads(nn.Module):
    """The policy's auxiliary classifiers: ``heads[name] = classes``, each ``logits = f W + b`` on
    features ``f`` [..., D]: SPO's preference-degree classifier on a sequence's mean completion state,
    SparsePO's learned masks on each token's state."""

    heads: tuple[tuple[str, int], ...]

    @nn.compact
    def __call__(self, features: Array) -> dict[str, Array]:
        """features [..., D] -> {name: logits [..., classes]} (fp32)."""
        out = {}
        for name, classes in self.heads:
            shape = (features.shape[-1], classes)
            w = self.param(f"{name}_kernel", _init(("embed", "value")), shape, jnp.float32)
            b = self.param(f"{name}_bias", _init(("value",), nn.initializers.zeros), (classes,), jnp.float32)
            out[name] = features.astype(jnp.float32) @ w + b
        return out


class ValueHead(nn.Module):
    """r = h W, W [D, K] without bias: K = 1 is the Bradley-Terry head (HF ``score.weight`` = W^T),
    K > 1 an ensemble of K value heads sharing the decoder (Secrets of RLHF II's strength ensemble)."""

    num_heads: int = 1

    @nn.compact
    def __call__(self, features: Array) -> Array:
        """features [N, D] -> rewards [N, K] (fp32)."""
        w = self.param("score", _init(("embed", "value")), (features.shape[-1], self.num_heads), jnp.float32)
        return jnp.einsum("nd,dk->nk", features.astype(jnp.float32), w)


class GPMHead(nn.Module):
    """GPM preference embedding v(x, y) in R^{2k}, and optional prompt-dependent block scales.

    "Beyond Bradley-Terry Models: A General Preference Model for Language Model Alignment"
    (Zhang et al., arXiv:2410.02197): the embedding is a linear map of the last token's hidden state,
    L2-normalised (the paper normalises v to the unit sphere so that the score is bounded by the
    scales and tau sets the sharpness); the scales lambda_b(x) >= 0 come from the prompt's last
    token through a softplus ("eigenvalue scale gate").

    ``normalize=False`` keeps the raw linear embedding. Why it exists: when every response's features
    share one dominant direction (a small decoder at initialisation), unit-norm embeddings start
    collapsed at one angle, and there a balanced preference cycle is a local minimum of the loss
    (the first-order angle terms cancel around the cycle); raw embeddings escape it.
    """

    dim: int = 2
    prompt_scales: bool = False
    normalize: bool = True

    @nn.compact
    def __call__(self, features: Array, prompt_features: Array | None = None) -> tuple[Array, Array | None]:
        """features [N, D] -> (embeddings [N, 2k] unit norm, scales [N, k] or None)."""
        d = features.shape[-1]
        w = self.param("embed", _init(("embed", "value")), (d, self.dim), jnp.float32)
        v = features.astype(jnp.float32) @ w
        if self.normalize:
            v = v * jax.lax.rsqrt(jnp.sum(v * v, axis=-1, keepdims=True) + 1e-12)
        scales = None
        if self.prompt_scales:
            ws = self.param("scale_gate", _init(("embed", "value")), (d, self.dim // 2), jnp.float32)
            bs = self.param(
                "scale_bias", _init(("value",), nn.initializers.zeros), (self.dim // 2,), jnp.float32
            )
            src = features if prompt_features is None else prompt_features
            scales = jax.nn.softplus(src.astype(jnp.float32) @ ws + bs)
        return v, scales


class PALHead(nn.Module):
    """PAL ideal-point head: features f(x, y) = h W_f [N, d], prototypes g_k [K, d], users' mixture
    logits w_i [U, K] and a learned log reward scale.

    "PAL: Pluralistic Alignment Framework for Learning from Heterogeneous Preferences" (Chen et al.,
    arXiv:2406.08469): r_i(x, y) = exp(log_scale) cos(f(x, y), sum_k softmax(w_i)_k g_k); a new user
    fits only its row of ``user_logits``.
    """

    dim: int = 16
    num_prototypes: int = 2
    num_users: int = 1

    @nn.compact
    def __call__(self, features: Array) -> dict[str, Array]:
        """features [N, D] -> {features [N, d], prototypes [K, d], user_logits [U, K], scale []}."""
        w = self.param("proj", _init(("embed", "value")), (features.shape[-1], self.dim), jnp.float32)
        protos = self.param(
            "prototypes",
            _init((None, "value"), nn.initializers.normal(1.0)),
            (self.num_prototypes, self.dim),
            jnp.float32,
        )
        users = self.param(
            "user_logits",
            _init((None, None), nn.initializers.zeros),
            (self.num_users, self.num_prototypes),
            jnp.float32,
        )
        log_scale = self.param(
            "log_scale", _init((), nn.initializers.constant(jnp.log(10.0))), (), jnp.float32
        )
        return {
            "features": features.astype(jnp.float32) @ w,
            "prototypes": protos,
            "user_logits": users,
            "scale": jnp.exp(log_scale),
        }


def make_head(config: HeadConfig) -> nn.Module:
    if config.kind == "value":
        return ValueHead(num_heads=config.num_heads)
    if config.kind == "gpm":
        return GPMHead(
            dim=config.gpm_dim, prompt_scales=config.gpm_prompt_scales, normalize=config.gpm_normalize
        )
    return PALHead(dim=config.pal_dim, num_prototypes=config.pal_prototypes, num_users=config.pal_users)
