"""Diffusion-DPO, denoising error and DDIM (inversion) steps against NumPy formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from alignjax.losses import registry
from alignjax.losses.diffusion import (
    ddim_inversion_step,
    ddim_step,
    denoising_error,
    diffusion_dpo,
    inversion_target,
)


def np_diffusion_dpo(ew, el, rw, rl, beta):
    inside = -0.5 * beta * ((ew - rw) - (el - rl))
    return np.logaddexp(0.0, -inside)


@pytest.fixture(scope="module")
def errors():
    rng = np.random.default_rng(0)
    return tuple(rng.uniform(0.05, 0.2, 4) for _ in range(4))


@pytest.fixture(scope="module")
def schedule():
    betas = np.linspace(1e-4, 0.02, 50)
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("use_jit", [False, True])
def test_diffusion_dpo_matches_numpy(errors, use_jit):
    fn = functools.partial(diffusion_dpo, beta=500.0)
    fn = jax.jit(fn) if use_jit else fn
    got = fn(*errors)
    assert got.shape == (4,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_diffusion_dpo(*errors, 500.0), rtol=1e-5)


def test_diffusion_dpo_model_equals_ref_is_log2(errors):
    ew, el, _, _ = errors
    np.testing.assert_allclose(diffusion_dpo(ew, el, ew, el), np.full(4, np.log(2)), rtol=1e-6)
    assert registry.canonical("dcpo") == "diffusion_dpo" and registry.spec("dcpo").needs_reference


def test_diffusion_dpo_grads_and_extremes(errors):
    with jax.enable_x64(True):
        check_grads(lambda a, b: diffusion_dpo(a, b, errors[2], errors[3], beta=50.0), errors[:2], order=1,
                    modes=["rev"])
    big = diffusion_dpo(*(jnp.asarray(e * 1e4, jnp.bfloat16) for e in errors))  # beta 5000: huge logits
    assert big.dtype == jnp.float32 and np.all(np.isfinite(big))
    # Lower model error on the winner than the reference -> loss below log 2.
    _, _, rw, rl = errors
    assert np.all(np.asarray(diffusion_dpo(rw - 1e-4, rl, rw, rl)) < np.log(2))


def test_denoising_error():
    rng = np.random.default_rng(1)
    eps, pred = rng.normal(size=(3, 4, 4, 2)), rng.normal(size=(3, 4, 4, 2))
    got = jax.jit(denoising_error)(eps, pred)
    np.testing.assert_allclose(got, ((eps - pred) ** 2).reshape(3, -1).mean(1), rtol=1e-5)
    with jax.enable_x64(True):
        check_grads(lambda p: denoising_error(eps, p), (pred,), order=1, modes=["rev"])
    out = denoising_error(jnp.asarray(eps, jnp.bfloat16), jnp.asarray(pred, jnp.bfloat16))
    assert out.dtype == jnp.float32


def np_ddim(x, eps, a_from, a_to):
    x0 = (x - np.sqrt(1 - a_from) * eps) / np.sqrt(a_from)
    return np.sqrt(a_to) * x0 + np.sqrt(1 - a_to) * eps


def test_ddim_inversion_then_step_recovers_input(schedule):
    rng = np.random.default_rng(2)
    x, eps = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 4, 2))
    t_prev, t = np.array([9, 19, 29]), np.array([19, 29, 39])
    inv = jax.jit(ddim_inversion_step)(x, eps, schedule, t_prev, t)
    a = schedule
    want = np.stack([np_ddim(x[b], eps[b], a[t_prev[b]], a[t[b]]) for b in range(3)])
    np.testing.assert_allclose(inv, want, rtol=1e-5, atol=1e-6)
    back = jax.jit(ddim_step)(inv, eps, schedule, t, t_prev)
    np.testing.assert_allclose(back, x, rtol=1e-4, atol=1e-5)
    # Scalar timesteps, and t_prev = -1 (the clean sample, alpha_bar = 1).
    x_t = ddim_inversion_step(x, eps, schedule, -1, 10)
    np.testing.assert_allclose(x_t, np.sqrt(a[10]) * x + np.sqrt(1 - a[10]) * eps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ddim_step(x_t, eps, schedule, 10, -1), x, rtol=1e-4, atol=1e-5)


def test_inversion_target_recovers_noise(schedule):
    rng = np.random.default_rng(3)
    x0, eps = rng.normal(size=(2, 3, 3)), rng.normal(size=(2, 3, 3))
    t = np.array([5, 40])
    a = schedule[t][:, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    np.testing.assert_allclose(inversion_target(x0, x_t, schedule, t), eps, rtol=1e-4, atol=1e-5)
    # One inversion step from the clean sample is exactly a forward-noising jump with eps_hat = eps.
    x_inv = ddim_inversion_step(x0, eps, schedule, -1, 7)
    np.testing.assert_allclose(inversion_target(x0, x_inv, schedule, 7), eps, rtol=1e-4, atol=1e-5)
