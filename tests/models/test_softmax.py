"""``alignjax.models.softmax`` against ``jax.nn``'s softmax and logsumexp (its CPU property is in
``test_kernels.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import logprobs
from alignjax.models import softmax

OPTIONS = {"default": {}, "strict": logprobs.strict_rounding("float32")}


def _rows() -> np.ndarray:
    """[6, 300] fp32: ordinary rows, logits of 1e4, masked (-inf) entries, a fully masked row, and
    rows holding +inf and NaN."""
    x = np.random.default_rng(0).normal(0, 3, (6, 300)).astype(np.float32)
    x[1] *= 1e4
    x[2, ::3] = -np.inf
    x[3] = -np.inf
    x[4, 17] = np.inf
    x[5, 299] = np.nan  # the last element: a select-reduce's max then skips it
    return x


PAIRS = {"logsumexp": (softmax.logsumexp, jax.nn.logsumexp), "softmax": (softmax.softmax, jax.nn.softmax)}


@pytest.mark.parametrize("options", OPTIONS, ids=OPTIONS)
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("name", PAIRS)
def test_values_are_jax_nn_bitwise_including_inf_nan_and_masked_rows(name, axis, options):
    ours, theirs = PAIRS[name]
    run = lambda f: jax.jit(lambda x: f(x, axis), compiler_options=OPTIONS[options])(jnp.asarray(_rows()))
    np.testing.assert_array_equal(run(ours), run(theirs))


@pytest.mark.parametrize("options", OPTIONS, ids=OPTIONS)
@pytest.mark.parametrize("name", PAIRS)
def test_gradients_are_jax_nn_bitwise(name, options):
    ours, theirs = PAIRS[name]
    x = jnp.asarray(_rows()[:3])
    w = jnp.asarray(np.random.default_rng(1).normal(size=x.shape).astype(np.float32))
    weights = w if name == "softmax" else w[:, 0]
    options = OPTIONS[options]
    grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x, -1) * weights)), compiler_options=options)
    np.testing.assert_array_equal(grad(ours)(x), grad(theirs)(x))
    tangent = lambda f: jax.jvp(lambda x: f(x, -1), (x,), (w,))[1]
    np.testing.assert_array_equal(tangent(ours), tangent(theirs))
