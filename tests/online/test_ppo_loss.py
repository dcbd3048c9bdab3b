"""PPO's pieces against TRL 0.x's PPOTrainer, ported (TRL 1.16 no longer ships it): the lines below are
``PPOTrainer.compute_rewards`` and ``PPOTrainer.loss`` from trl/trainer/ppo_trainer.py and
``masked_mean`` / ``masked_var`` / ``masked_whiten`` / ``clip_by_value`` / ``AdaptiveKLController``
from trl/core.py and trl/trainer/utils.py (huggingface/trl at commit 00667e8c, the 0.x series), with
``self.config.*`` / ``self.kl_ctl.value`` made arguments; run on torch tensors, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alignjax.losses import policy_gradient as pg

N, T = 6, 7


# ---- ported from TRL 0.x (see the module docstring) ---------------------------------------------


def masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    else:
        return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    mean = masked_mean(values, mask)
    centered_values = values - mean
    variance = masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def clip_by_value(x, tensor_min, tensor_max):
    clipped = torch.max(torch.min(x, tensor_max), tensor_min)
    return clipped


class AdaptiveKLController:
    def __init__(self, init_kl_coef, target, horizon):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current, n_steps):
        target = self.target
        proportional_error = np.clip(current / target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


def compute_rewards(kl_coef, scores, logprobs, ref_logprobs, masks):
    rewards, non_score_rewards = [], []
    for score, logprob, ref_logprob, mask in zip(scores, logprobs, ref_logprobs, masks):
        kl = logprob - ref_logprob
        non_score_reward = -kl_coef * kl
        non_score_rewards.append(non_score_reward)
        reward = non_score_reward.clone()
        last_non_masked_index = mask.nonzero()[-1]
        reward[last_non_masked_index] += score
        rewards.append(reward)
    return torch.stack(rewards), torch.stack(non_score_rewards)


def trl_loss(config, old_logprobs, values, rewards, vpreds, logprobs, mask):
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]

    values = values * mask
    rewards = rewards * mask

    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + config["gamma"] * nextvalues - values[:, t]
        lastgaelam = delta + config["gamma"] * config["lam"] * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)

    returns = advantages + values
    advantages = masked_whiten(advantages, mask)
    advantages = advantages.detach()

    cliprange_value = config["cliprange_value"]
    vpredclipped = clip_by_value(vpreds, values - cliprange_value, values + cliprange_value)

    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1).double(), mask)

    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - config["cliprange"], 1.0 + config["cliprange"])

    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses).double(), mask)

    loss = pg_loss + config["vf_coef"] * vf_loss
    approxkl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    return loss, dict(policy=pg_loss, value=config["vf_coef"] * vf_loss, pg_clipfrac=pg_clipfrac,
                      vf_clipfrac=vf_clipfrac, approxkl=approxkl, returns=masked_mean(returns, mask))


# ---- tests ----------------------------------------------------------------------------------------


def _data(seed=0):
    r = np.random.default_rng(seed)
    lengths = r.integers(2, T + 1, N)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    old = -r.uniform(0.1, 2.0, (N, T)).astype(np.float32)
    f = lambda x: x.astype(np.float32)
    return dict(mask=mask, old=old, cur=f(old + r.normal(0, 0.3, (N, T))),
                ref=f(old + r.normal(0, 0.2, (N, T))), values=f(r.normal(0, 1, (N, T))),
                vpreds=f(r.normal(0, 1, (N, T))), scores=f(r.normal(0, 1, N)))


def test_token_rewards_equal_trl():
    d = _data(0)
    got, got_ns = pg.ppo_token_rewards(d["scores"], d["old"], d["ref"], d["mask"], kl_coef=0.05)
    t = lambda k: torch.tensor(d[k])
    want, want_ns = compute_rewards(0.05, t("scores"), t("old"), t("ref"), t("mask"))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_ns, want_ns.numpy(), rtol=1e-6, atol=1e-7)


CONFIGS = [dict(gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1),
           dict(gamma=0.9, lam=0.8, cliprange=0.1, cliprange_value=0.3, vf_coef=0.5)]


@pytest.mark.parametrize("config", CONFIGS)
def test_ppo_loss_and_grads_equal_trl(config):
    d = _data(1)
    rewards, _ = pg.ppo_token_rewards(d["scores"], d["old"], d["ref"], d["mask"], kl_coef=0.05)
    rewards = np.asarray(rewards)
    cur, vp = (torch.tensor(d[k], dtype=torch.float64, requires_grad=True) for k in ("cur", "vpreds"))
    t = lambda k: torch.tensor(d[k], dtype=torch.float64)
    r64 = torch.tensor(rewards, dtype=torch.float64)
    want, stats = trl_loss(config, t("old"), t("values"), r64, vp, cur, t("mask"))
    want.backward()
    fn = lambda c, v: pg.ppo(c, d["old"], v, d["values"], rewards, d["mask"], **config)
    (loss, m), (g_cur, g_v) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
        jnp.asarray(d["cur"]), jnp.asarray(d["vpreds"]))
    np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
    np.testing.assert_allclose(g_cur, cur.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g_v, vp.grad.numpy(), rtol=1e-4, atol=1e-7)
    for ours, theirs in (("ppo/loss/policy", "policy"), ("ppo/loss/value", "value"),
                         ("ppo/policy/clipfrac", "pg_clipfrac"), ("ppo/val/clipfrac", "vf_clipfrac"),
                         ("ppo/policy/approxkl", "approxkl"), ("ppo/returns/mean", "returns")):
        np.testing.assert_allclose(m[ours], stats[theirs].item(), rtol=1e-5, atol=1e-7, err_msg=ours)
    assert 0 < stats["pg_clipfrac"].item() < 1 and 0 < stats["vf_clipfrac"].item() < 1  # both clips exercised


def test_whitened_rewards_are_trls_masked_whiten_then_the_loss():
    d = _data(2)
    rewards = np.asarray(pg.ppo_token_rewards(d["scores"], d["old"], d["ref"], d["mask"], kl_coef=0.05)[0])
    mask = torch.tensor(d["mask"], dtype=torch.float64)
    r64 = torch.tensor(rewards, dtype=torch.float64)
    whitened = (masked_whiten(r64, mask, shift_mean=False) * mask).numpy()
    a = pg.ppo(d["cur"], d["old"], d["vpreds"], d["values"], rewards, d["mask"], whiten_rewards=True)[0]
    b = pg.ppo(d["cur"], d["old"], d["vpreds"], d["values"], whitened, d["mask"])[0]
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_adaptive_kl_equals_trl():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    value = 0.2
    for kl, n in ((3.0, 256), (6.5, 256), (20.0, 512)):
        ctl.update(kl, n)
        value = pg.adaptive_kl_coef(value, kl, n, target=6.0, horizon=10000)
        assert value == pytest.approx(ctl.value, rel=1e-12)


def test_on_policy_first_step_ratio_one_and_policy_gradient():
    """pi == pi_old: ratio 1, nothing clipped, and d L_pg / d log pi_t = -A_t / sum(m) (whitened GAE)."""
    d = _data(3)
    rewards = np.asarray(pg.ppo_token_rewards(d["scores"], d["old"], d["old"], d["mask"], kl_coef=0.1)[0])
    fn = lambda c: pg.ppo(c, d["old"], d["values"], d["values"], rewards, d["mask"], vf_coef=0.0)
    (loss, m), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(d["old"]))
    assert float(m["ppo/policy/clipfrac"]) == 0.0 and float(m["ppo/policy/approxkl"]) == 0.0
    adv, _ = pg.gae(rewards, d["values"], d["mask"])
    want = -np.asarray(pg.masked_whiten(adv, d["mask"])) * d["mask"] / d["mask"].sum()
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
