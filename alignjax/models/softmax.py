"""Softmax and logsumexp with ``jax.nn``'s values, and a stabilising max XLA:CPU runs fast.

``jnp.max`` lowers to a NaN-propagating maximum, which XLA:CPU's loop emitter (the one
``logprobs.strict_rounding`` selects) does not vectorise: the vocabulary max of a bench-7m DPO
step's [16, 128, 8192] fp32 logits took 14 ms, a ``select(a > b, a, b)`` reduction 4 ms
(docs/benchmarks.md). In a softmax or logsumexp the max is only the shift that keeps ``exp``
finite: a NaN anywhere in a row still reaches the result through the sum, so the shift need not
carry it, and the maximum itself is exact, so the values are ``jax.nn``'s bitwise. Other backends
keep ``jnp.max``: the gain was measured on XLA:CPU only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def stable_shift(x: Array, axis: int = -1) -> Array:
    """The row maximum of ``x`` along ``axis`` (kept as a size-1 dim), without gradient: the shift
    of a softmax or logsumexp. On CPU a NaN in a row need not come out (see the module docstring).

    On CPU the select-reduction runs within ``gcd(length, device count)`` equal blocks of the axis,
    and ``jnp.max`` over the block maxima: a collective reduces only with a computation it knows,
    and a mesh that splits the axis evenly (the vocabulary over ``tensor``) splits it at block
    boundaries, so the select-reduction never spans devices. One device: one block.
    """
    x = jax.lax.stop_gradient(x)
    if jax.default_backend() != "cpu":
        return jnp.max(x, axis, keepdims=True)
    axis = axis % x.ndim
    blocks = math.gcd(x.shape[axis], jax.device_count())
    blocked = x.reshape(*x.shape[:axis], blocks, x.shape[axis] // blocks, *x.shape[axis + 1 :])
    lowest = np.array(-np.inf, x.dtype)
    block_max = jax.lax.reduce(blocked, lowest, lambda a, b: jax.lax.select(a > b, a, b), (axis + 1,))
    return jnp.max(block_max, axis, keepdims=True)


def logsumexp(x: Array, axis: int = -1) -> Array:
    """``jax.nn.logsumexp(x, axis)`` of a real ``x`` over one axis: ``m + log sum exp(x - m)``,
    with ``m`` the row max (0 where that is infinite, as there)."""
    top = stable_shift(x, axis)
    top = jnp.where(jnp.isfinite(top), top, jnp.zeros((), top.dtype))
    return jnp.log(jnp.sum(jnp.exp(x - top), axis)) + jnp.squeeze(top, axis)


def softmax(x: Array, axis: int = -1) -> Array:
    """``jax.nn.softmax(x, axis)``: ``exp(x - m) / sum exp(x - m)``, differentiated as there (through
    the quotient, the shift held constant)."""
    unnormalized = jnp.exp(x - stable_shift(x, axis))
    return unnormalized / jnp.sum(unnormalized, axis, keepdims=True)
