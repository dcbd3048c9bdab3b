"""Reproduction: Diffusion-DPO moves a small 2-D diffusion model's samples into a preferred region.

Claim ("Diffusion Model Alignment Using Direct Preference Optimization", Wallace et al., arXiv 2311.12908):
fine-tuning a diffusion model with Diffusion-DPO on preference pairs shifts its samples toward the
preferred outcomes while staying close to the reference model.

Setup: data = an equal mixture of two Gaussians at (-2, 0) and (+2, 0) (std 0.5); preferred region x > 0.
A tiny MLP denoiser eps_theta(x_t, t) (flax, 2 x 128 SiLU, sinusoidal t embedding) is trained by DDPM
(T = 50 steps, linear betas) on the mixture: the reference. Pairs: two reference samples, one in each
half-plane; the winner is the one with x > 0. Diffusion-DPO (``alignjax.losses.get("diffusion_dpo")``,
same t and noise for winner and loser) fine-tunes a copy. Metric: the share of 2,000 ancestral samples
with x > 0, and the share within 3 std of either mode (sample quality).

    python -m alignjax.main --config=experiments/repro_diffusion2d.py \
        --workdir=workdirs/repro_diff
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import alignjax.losses as losses
from alignjax.losses.diffusion import denoising_error
from alignjax.repro import common

MODES = np.array([[-2.0, 0.0], [2.0, 0.0]], np.float32)
STD = 0.5


class Denoiser(nn.Module):
    """eps_theta(x_t, t): [B, 2], [B] -> [B, 2]."""

    width: int = 128
    num_steps: int = 50

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        freqs = jnp.exp(jnp.linspace(0.0, jnp.log(100.0), 8))
        angle = (t.astype(jnp.float32) / self.num_steps)[:, None] * freqs[None] * 2 * jnp.pi
        h = jnp.concatenate([x, jnp.sin(angle), jnp.cos(angle)], -1)
        h = nn.silu(nn.Dense(self.width)(h))
        h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(2)(h)


def schedule(num_steps: int) -> tuple[jax.Array, jax.Array]:
    betas = jnp.linspace(1e-3, 0.2, num_steps)
    return betas, jnp.cumprod(1.0 - betas)


def sample_data(key: jax.Array, n: int) -> jax.Array:
    k1, k2 = jax.random.split(key)
    mode = jax.random.bernoulli(k1, 0.5, (n,)).astype(jnp.int32)
    return jnp.asarray(MODES)[mode] + STD * jax.random.normal(k2, (n, 2))


def noised(x0: jax.Array, t: jax.Array, eps: jax.Array, abar: jax.Array) -> jax.Array:
    a = abar[t][:, None]
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps


def sampler(model: Denoiser, num_steps: int):
    """DDPM ancestral sampling, jitted: (params, key, n) -> x_0 [n, 2]."""
    betas, abar = schedule(num_steps)

    def run(params, key, n):
        k0, key = jax.random.split(key)
        x = jax.random.normal(k0, (n, 2))

        def body(x, inputs):
            t, k = inputs
            eps = model.apply(params, x, jnp.full((n,), t))
            mean = (x - betas[t] / jnp.sqrt(1.0 - abar[t]) * eps) / jnp.sqrt(1.0 - betas[t])
            noise = jnp.where(t > 0, jnp.sqrt(betas[t]), 0.0) * jax.random.normal(k, x.shape)
            return mean + noise, None

        ts = jnp.arange(num_steps - 1, -1, -1)
        x, _ = jax.lax.scan(body, x, (ts, jax.random.split(key, num_steps)))
        return x

    return jax.jit(run, static_argnums=2)


def pretrain(model: Denoiser, key: jax.Array, steps: int, batch: int, lr: float, num_steps: int) -> Any:
    _, abar = schedule(num_steps)
    k_init, key = jax.random.split(key)
    params = model.init(k_init, jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))
    tx = optax.adam(lr)

    @jax.jit
    def step(params, opt, key):
        k1, k2, k3 = jax.random.split(key, 3)
        x0 = sample_data(k1, batch)
        t = jax.random.randint(k2, (batch,), 0, num_steps)
        eps = jax.random.normal(k3, x0.shape)
        xt = noised(x0, t, eps, abar)
        g = jax.grad(lambda p: jnp.mean(denoising_error(eps, model.apply(p, xt, t))))(params)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt

    opt = tx.init(params)
    for k in jax.random.split(key, steps):
        params, opt = step(params, opt, k)
    return params


def make_pairs(samples: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Winner = a sample with x > 0, loser = one with x <= 0 (both from the reference model)."""
    right, left = samples[samples[:, 0] > 0], samples[samples[:, 0] <= 0]
    m = min(n, len(right), len(left))
    return right[:m], left[:m]


def diffusion_dpo_finetune(
    model: Denoiser,
    ref_params: Any,
    winners: np.ndarray,
    losers: np.ndarray,
    key: jax.Array,
    *,
    steps: int,
    batch: int,
    lr: float,
    beta: float,
    num_steps: int,
) -> tuple[Any, list[float]]:
    _, abar = schedule(num_steps)
    loss_fn = losses.get("diffusion_dpo")
    xw_all, xl_all = jnp.asarray(winners), jnp.asarray(losers)
    tx = optax.adam(lr)

    def objective(params, key):
        k1, k2, k3 = jax.random.split(key, 3)
        idx = jax.random.randint(k1, (batch,), 0, xw_all.shape[0])
        xw, xl = xw_all[idx], xl_all[idx]
        t = jax.random.randint(k2, (batch,), 0, num_steps)
        eps = jax.random.normal(k3, xw.shape)  # the same t and noise for winner and loser
        zw, zl = noised(xw, t, eps, abar), noised(xl, t, eps, abar)
        err = lambda p, z: denoising_error(eps, model.apply(p, z, t))  # noqa: E731
        ref = jax.lax.stop_gradient(ref_params)
        return jnp.mean(loss_fn(err(params, zw), err(params, zl), err(ref, zw), err(ref, zl), beta=beta))

    @jax.jit
    def step(params, opt, key):
        loss, g = jax.value_and_grad(objective)(params, key)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt, loss

    params, opt, curve = ref_params, tx.init(ref_params), []
    for k in jax.random.split(key, steps):
        params, opt, loss = step(params, opt, k)
        curve.append(float(loss))
    return params, curve


def sample_stats(x: np.ndarray) -> dict[str, float]:
    d = np.min(np.linalg.norm(x[:, None, :] - MODES[None], axis=-1), axis=1)
    return {"preferred_share": float(np.mean(x[:, 0] > 0)), "near_mode_share": float(np.mean(d < 3 * STD))}


def run(config: Any, workdir: str) -> dict[str, Any]:
    p = common.repro_params(config, "repro_diffusion2d")
    model = Denoiser(num_steps=p.num_steps)
    sample = sampler(model, p.num_steps)
    rows: dict[int, dict[str, float]] = {}
    for seed in p.seeds:
        key = jax.random.PRNGKey(seed)
        k_pre, k_pairs, k_ft, k_eval = jax.random.split(key, 4)
        ref_params = pretrain(model, k_pre, p.pretrain_steps, p.batch_size, p.pretrain_lr, p.num_steps)
        ref_samples = np.asarray(sample(ref_params, k_pairs, p.num_pair_samples))
        winners, losers = make_pairs(ref_samples, p.num_pair_samples)
        params, curve = diffusion_dpo_finetune(
            model,
            ref_params,
            winners,
            losers,
            k_ft,
            steps=p.dpo_steps,
            batch=p.batch_size,
            lr=p.dpo_lr,
            beta=p.beta,
            num_steps=p.num_steps,
        )
        before = sample_stats(np.asarray(sample(ref_params, k_eval, p.num_eval_samples)))
        after = sample_stats(np.asarray(sample(params, k_eval, p.num_eval_samples)))
        rows[seed] = {
            "ref_preferred_share": before["preferred_share"],
            "dpo_preferred_share": after["preferred_share"],
            "ref_near_mode_share": before["near_mode_share"],
            "dpo_near_mode_share": after["near_mode_share"],
            "num_pairs": float(len(winners)),
            "first_loss": curve[0],
            "last_loss": float(np.mean(curve[-20:])),
        }
    keys = (
        "ref_preferred_share",
        "dpo_preferred_share",
        "ref_near_mode_share",
        "dpo_near_mode_share",
        "first_loss",
        "last_loss",
    )
    header = ["metric", *(f"seed {s}" for s in rows), "mean ± sd"]
    table = [[k, *(f"{rows[s][k]:.3f}" for s in rows), common.fmt([rows[s][k] for s in rows])] for k in keys]
    markdown = common.markdown_table(header, table)
    common.write_table(workdir, {"rows": rows, "config": p.to_dict()}, markdown)
    return {"rows": rows, "markdown": markdown}
