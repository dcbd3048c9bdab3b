"""GRPO / RLOO losses against TRL 1.16's own loss code, executed on torch tensors (not restated).

``GRPOTrainer._compute_loss`` and ``RLOOTrainer._compute_loss`` are called unbound on a stand-in
``self`` carrying only the attributes they read, whose ``_get_per_token_logps_and_entropies`` returns
given per-token log-probs (a leaf tensor, so torch gives the gradient). The advantage computations live
inside TRL's ``_generate_and_score_completions`` (which also samples and scores), so their lines are
ported below, from trl/trainer/grpo_trainer.py and trl/trainer/rloo_trainer.py of TRL 1.16.0, calling
TRL's own ``nanstd``.
"""

from __future__ import annotations

import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alignjax import losses
from alignjax.losses import policy_gradient as pg

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
rloo_trainer = pytest.importorskip("trl.trainer.rloo_trainer")
from trl.trainer.utils import nanstd as trl_nanstd  # noqa: E402

G, PROMPTS, T = 4, 3, 6
N = G * PROMPTS


def _data(seed: int):
    r = np.random.default_rng(seed)
    lengths = r.integers(1, T + 1, N)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    old = -r.uniform(0.1, 2.0, (N, T)).astype(np.float32)
    cur = (old + r.normal(0, 0.3, (N, T))).astype(np.float32)  # some ratios leave [0.8, 1.2]
    ref = (old + r.normal(0, 0.3, (N, T))).astype(np.float32)
    rewards = r.normal(0, 1, N).astype(np.float32)
    rewards[2] = np.nan  # an unscorable completion
    rewards[4:8] = 1.0  # a group with zero std
    return {"cur": cur, "old": old, "ref": ref, "mask": mask, "rewards": rewards}


def _accelerator():
    return types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                 reduce=lambda x, reduction="sum": x)


def _ids():
    long = dict(dtype=torch.long)
    return {"prompt_ids": torch.zeros(N, 2, **long), "prompt_mask": torch.ones(N, 2, **long),
            "completion_ids": torch.zeros(N, T, **long)}


def _trl_grpo(d, adv, *, loss_type, beta, eps_low, eps_high, level="token", delta=None, max_len=T):
    token = torch.tensor(d["cur"], requires_grad=True)
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (token, torch.zeros_like(token), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_len, accelerator=_accelerator(), _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)))
    mask = torch.tensor(d["mask"]).long()
    inputs = {**_ids(), "completion_mask": mask,
              "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(d["old"]),
              "ref_per_token_logps": torch.tensor(d["ref"]), "num_items_in_batch": mask.sum()}
    loss = grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), token.grad.numpy(), metrics


def _trl_grpo_advantages(rewards: np.ndarray, scale_rewards: str) -> np.ndarray:
    """grpo_trainer.py (TRL 1.16.0) `_generate_and_score_completions`, sum_then_normalize branch."""
    rewards = torch.tensor(rewards)
    num_generations = G
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = trl_nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0).numpy()


def _trl_rloo_advantages(rewards, old, ref, mask, beta, normalize_advantages) -> np.ndarray:
    """rloo_trainer.py (TRL 1.16.0) `_generate_and_score_completions`: KL in the reward, leave-one-out."""
    rewards = torch.tensor(rewards)
    old_per_token_logps, ref_per_token_logps = torch.tensor(old), torch.tensor(ref)
    completion_mask, num_generations = torch.tensor(mask), G
    if beta != 0.0:
        per_token_kl = old_per_token_logps - ref_per_token_logps
        kl = (per_token_kl * completion_mask).sum(-1)
        rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    baselines = baselines.view(-1)
    advantages = rewards - baselines
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (trl_nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0).numpy()


def _trl_rloo(d, adv, *, eps_low, eps_high):
    token = torch.tensor(d["cur"], requires_grad=True)
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (token, torch.zeros_like(token), None),
        epsilon_low=eps_low, epsilon_high=eps_high, model=types.SimpleNamespace(training=True),
        aux_loss_enabled=False, accelerator=_accelerator(), _metrics=defaultdict(lambda: defaultdict(list)))
    mask = torch.tensor(d["mask"])
    inputs = {**_ids(), "completion_mask": mask,
              "advantages": torch.tensor(adv), "old_logps": (torch.tensor(d["old"]) * mask).sum(1)}
    loss = rloo_trainer.RLOOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), token.grad.numpy(), metrics


@pytest.mark.parametrize("scale_rewards", pg.SCALE_REWARDS)
def test_grpo_advantages_equal_trl(scale_rewards):
    d = _data(0)
    ours = pg.group_advantages(d["rewards"], num_generations=G, scale_rewards=scale_rewards)
    np.testing.assert_allclose(ours, _trl_grpo_advantages(d["rewards"], scale_rewards), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta,normalize", [(0.0, False), (0.05, False), (0.05, True)])
def test_rloo_advantages_equal_trl(beta, normalize):
    d = _data(1)
    rewards = pg.kl_penalized_rewards(d["rewards"], d["old"], d["ref"], d["mask"], beta=beta)
    ours = pg.rloo_advantages(rewards, num_generations=G, normalize=normalize)
    want = _trl_rloo_advantages(d["rewards"], d["old"], d["ref"], d["mask"], beta, normalize)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)


GRPO_CASES = [
    dict(loss_type="grpo", beta=0.04, eps_low=0.2, eps_high=0.2),
    dict(loss_type="bnpo", beta=0.0, eps_low=0.2, eps_high=0.2),
    dict(loss_type="dr_grpo", beta=0.1, eps_low=0.2, eps_high=0.28, max_len=9),
    dict(loss_type="dapo", beta=0.0, eps_low=0.2, eps_high=0.28),
    dict(loss_type="dapo", beta=0.02, eps_low=0.1, eps_high=0.3, delta=1.3),
    dict(loss_type="grpo", beta=0.04, eps_low=3e-4, eps_high=4e-4, level="sequence"),
]


@pytest.mark.parametrize("case", GRPO_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_grpo_loss_grads_and_metrics_equal_trl(case):
    d = _data(2)
    adv = pg.group_advantages(d["rewards"], num_generations=G)
    want_loss, want_grad, want_m = _trl_grpo(d, np.asarray(adv), **case)
    hyper = dict(beta=case["beta"], epsilon_low=case["eps_low"], epsilon_high=case["eps_high"],
                 loss_type=case["loss_type"], importance_sampling_level=case.get("level", "token"),
                 max_completion_length=case.get("max_len"), delta=case.get("delta"))
    fn = lambda cur: losses.get("grpo")(cur, d["old"], d["ref"], d["mask"], adv, **hyper)
    (loss, metrics), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(jnp.asarray(d["cur"]))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"):
        if k in want_m:
            np.testing.assert_allclose(metrics[k], want_m[k], rtol=1e-5, atol=1e-7, err_msg=k)
        else:
            assert k not in metrics
    assert want_m["clip_ratio/region_mean"] > 0 or case.get("level") == "sequence"  # clipping is exercised


def test_rloo_loss_grads_and_metrics_equal_trl():
    d = _data(3)
    adv = pg.rloo_advantages(d["rewards"], num_generations=G)
    old = (d["old"] * d["mask"]).sum(1)
    want_loss, want_grad, want_m = _trl_rloo(d, np.asarray(adv), eps_low=0.1, eps_high=0.05)
    fn = lambda cur: losses.get("rloo")(cur, old, d["mask"], adv, epsilon_low=0.1, epsilon_high=0.05)
    (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(d["cur"]))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        np.testing.assert_allclose(metrics[k], want_m[k], rtol=1e-6, err_msg=k)
    assert want_m["clip_ratio/region_mean"] > 0


@pytest.mark.parametrize("loss_type", pg.LOSS_TYPES)
def test_on_policy_step_is_the_policy_gradient(loss_type):
    """Policy == behaviour == reference: ratio 1, nothing clipped, KL 0, and the gradient w.r.t. a tabular
    policy's logits is the REINFORCE direction -sum_i c_i A_i sum_t m_it (e_{o_it} - softmax(z_t)),
    c_i the aggregation's weight of sequence i's tokens."""
    V = 5
    r = np.random.default_rng(4)
    logits = jnp.asarray(r.normal(0, 1, (N, T, V)), jnp.float32)
    tokens = r.integers(0, V, (N, T))
    d = _data(4)
    mask = jnp.asarray(d["mask"])
    adv = pg.group_advantages(d["rewards"], num_generations=G)

    def loss(z):
        lp = jnp.take_along_axis(jax.nn.log_softmax(z), tokens[..., None], -1)[..., 0]
        old = jax.lax.stop_gradient(lp)
        return pg.grpo(lp, old, old, mask, adv, beta=0.1, loss_type=loss_type)

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(logits)
    assert np.isfinite(float(value))
    assert float(metrics["kl"]) == 0.0 and float(metrics["clip_ratio/region_mean"]) == 0.0
    lengths = np.asarray(mask).sum(1)
    c = {"grpo": 1.0 / (N * lengths), "bnpo": np.full(N, 1.0 / lengths.sum()),
         "dr_grpo": np.full(N, 1.0 / (N * T)), "dapo": np.full(N, 1.0 / lengths.sum())}[loss_type]
    onehot = np.eye(V)[tokens]
    probs = np.asarray(jax.nn.softmax(logits))
    want = -(c * np.asarray(adv))[:, None, None] * np.asarray(mask)[..., None] * (onehot - probs)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_registered_as_trained_by_the_online_job():
    for name in ("grpo", "rloo"):
        spec = losses.spec(name)
        assert spec.family == "policy_gradient" and not spec.trainable
        assert "grpo" in spec.status.trained_by
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        pg.grpo(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None, jnp.ones((2, 3)), jnp.zeros(2), loss_type="ppo")
