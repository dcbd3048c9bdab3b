"""PPO with a value head through the shared train loop (the ``ppo`` job, :mod:`alignjax.jobs.online`;
``experiments/ppo.py``).

The policy and its critic are one model: the decoder plus a value head on its hidden states
(:class:`PolicyValueModel`, params ``{"decoder", "head"}``, checkpointed together). Each step, as for
GRPO (:mod:`alignjax.online.train`), the step's prompts are rolled out from the current decoder
(``config.online.num_generations`` per prompt) and scored by the reward source; then the jitted step

1. computes the behaviour values ``V`` (value head of the rollout policy, the state before each
   completion token) and the reference log-probs,
2. forms the token rewards: the score on the last completion token and ``-kl_coef (log pi_old -
   log pi_ref)`` on every token (:func:`alignjax.losses.policy_gradient.ppo_token_rewards`), with
   ``whiten_rewards`` optional,
3. takes ``config.online.num_iterations`` optimiser steps of the clipped PPO policy + value loss
   (:func:`alignjax.losses.policy_gradient.ppo`: GAE with ``gamma``/``lam``, whitened advantages,
   ``cliprange`` / ``cliprange_value`` / ``vf_coef``), as TRL 0.x's PPOTrainer does.

The KL coefficient is fixed (``config.loss.kl_coef``); :func:`alignjax.losses.policy_gradient.
adaptive_kl_coef` is the adaptive controller's update, not wired into the step yet. The value head
starts from a random init (TRL starts it from the reward model). Metrics: TRL's ``reward``,
``reward_std``, ``kl`` (TRL 0.x's ``objective/kl``: the mean over sequences of the summed
``log pi_old - log pi_ref``), the loss's ``ppo/*`` and ``completions/*``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from alignjax import flops
from alignjax.losses import policy_gradient as pg
from alignjax.models.heads import HeadConfig
from alignjax.online import rollout
from alignjax.online import train as online
from alignjax.reward.model import RewardModel, RewardModelConfig
from alignjax.train import step as steplib

# PPO hyperparameters config.loss may set (the loss's keywords, and the reward's KL coefficient).
HYPERPARAMETERS = {**{k: p.default for k, p in inspect.signature(pg.ppo).parameters.items()
                      if p.kind is p.KEYWORD_ONLY}, "kl_coef": 0.05}


@dataclasses.dataclass(frozen=True)
class PolicyValueConfig(RewardModelConfig):
    """The decoder's config and the value head's (what the checkpoint manifest records)."""

    @property
    def lora(self) -> Any:
        return self.decoder.lora


class PolicyValueModel(RewardModel):
    """The policy's decoder with a value head: ``apply`` gives the LM logits, :meth:`token_values` the
    critic's value of the state before each token."""

    def __init__(self, decoder: Any) -> None:
        super().__init__(decoder, HeadConfig(kind="value", num_heads=1))
        self.config = PolicyValueConfig(decoder.config, self.head_config)

    def apply(self, params: Any, input_ids: jax.Array, **kwargs: Any) -> jax.Array:
        return self.decoder.apply(params["decoder"], input_ids, **kwargs)

    def token_values(self, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        """[R, T]: ``out[:, t]`` = the value head on the hidden state at ``t - 1`` (the state in which
        token ``t`` was chosen, as token log-probs are aligned), 0 at ``t = 0``."""
        hidden = self.decoder.hidden(params["decoder"], batch["input_ids"], positions=batch["positions"],
                                     segment_ids=batch["segment_ids"]).astype(jnp.float32)
        R, T, D = hidden.shape
        v = self.head.apply({"params": params["head"]}, hidden.reshape(R * T, D))[:, 0].reshape(R, T)
        return jnp.concatenate([jnp.zeros_like(v[:, :1]), v[:, :-1]], axis=1)


@dataclasses.dataclass(frozen=True)
class PPOSpec:
    loss: str
    hyperparameters: tuple[tuple[str, Any], ...]
    batch_size: int
    num_generations: int
    temperature: float
    num_iterations: int
    reference: str = "model"
    kind: str = "sft"
    nan_at_step: int = -1
    stateful: bool = False


def make_spec(config: Any, batch_size: int, reference: str) -> PPOSpec:
    """From ``config.loss`` (keys of :data:`HYPERPARAMETERS`) and ``config.online``; an unknown key is
    an error naming it."""
    if config.loss.name != "ppo":
        raise ValueError(f"config.loss.name={config.loss.name!r}: the ppo job trains the 'ppo' loss")
    if config.reference.kind != "frozen":
        raise ValueError(f"config.reference.kind={config.reference.kind!r}: PPO's KL penalty needs 'frozen'")
    if int(config.model.lora.rank):
        raise ValueError("config.model.lora.rank > 0: the ppo job trains the full policy and its value head")
    hyper = {**HYPERPARAMETERS, **online.loss_hyperparameters(config.loss, HYPERPARAMETERS, "PPO")}
    o = config.online
    return PPOSpec("ppo", tuple(sorted(hyper.items())), int(batch_size), int(o.num_generations),
                   float(o.temperature), int(o.num_iterations),
                   nan_at_step=int(config.train.get("nan_at_step", -1)))


def make_train_step(model: PolicyValueModel, spec: PPOSpec, tx: Any, schedule: Any, **kwargs: Any):
    """Behaviour values, reference log-probs and token rewards once per rollout batch, then
    ``num_iterations`` PPO updates (``alignjax.train.step.make_train_step`` with the PPO loss)."""

    hyper = dict(spec.hyperparameters)
    kl_coef = float(hyper.pop("kl_coef"))
    T = spec.temperature

    def loss_fn(params: Any, ref_params: Any, loss_state: Any, batch: Mapping[str, jax.Array]):
        lp = rollout.teacher_forced_logps(model.decoder, params["decoder"], batch, T)
        vpred = model.token_values(params, batch)
        loss, m = pg.ppo(lp, batch["old_token_logps"], vpred, batch["old_values"], batch["token_rewards"],
                         batch["loss_mask"], **hyper)
        return loss, ({**m, "loss": loss}, None)

    inner = steplib.make_train_step(model, spec, tx, schedule, loss_fn=loss_fn, **kwargs)

    def prepare(params: Any, ref_params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        mask, old = batch["loss_mask"], batch["old_token_logps"]
        ref = rollout.teacher_forced_logps(model.decoder, ref_params["decoder"], batch, T)
        rewards, _ = pg.ppo_token_rewards(batch["rewards"], old, ref, mask, kl_coef=kl_coef)
        lengths = jnp.sum(mask, -1)
        stats = {
            "reward": jnp.mean(batch["rewards"]), "reward_std": pg.nanstd(batch["rewards"]),
            "kl": jnp.mean(jnp.sum((old - ref) * mask, -1)),
            "completions/mean_length": jnp.mean(lengths), "completions/min_length": jnp.min(lengths),
            "completions/max_length": jnp.max(lengths),
            "completions/clipped_ratio": 1.0 - jnp.mean(batch["stopped"]),
        }
        values = jax.lax.stop_gradient(model.token_values(params, batch))
        extra = {"old_values": values, "token_rewards": rewards}
        return extra, stats

    def step(state: Any, batch: Any):
        extra, stats = jax.vmap(lambda b: prepare(state["params"], state["ref_params"], b))(batch)
        batch = {**batch, **extra}
        history = []
        for _ in range(spec.num_iterations):
            state, metrics = inner(state, batch)
            history.append(metrics)
        out = {k: jnp.mean(jnp.stack([m[k] for m in history])) for k in history[0]}
        out[steplib.NONFINITE] = jnp.max(jnp.stack([m[steplib.NONFINITE] for m in history]))
        out.update({k: jnp.mean(v) for k, v in stats.items()})
        return state, out

    return step


class PPOObjective(online.PolicyGradientObjective):
    """The loop hook for PPO: rollouts from the decoder's params (see the module docstring)."""

    def make_step_spec(self, config: Any, batch_size: int, reference: str) -> PPOSpec:
        return make_spec(config, batch_size, reference)

    make_train_step = staticmethod(make_train_step)

    @staticmethod
    def model_flops(model: Any, spec: PPOSpec, host: Mapping[str, Any]) -> float:
        """The decoder's forward + backward per iteration, the reference forward and the behaviour
        value forward (the value head's few FLOPs are not counted; sampling is not counted)."""
        f = flops.step_flops(model.decoder.config, host, reference_forward=True)
        return spec.num_iterations * f["policy"] + 2 * f["reference"]

    def prepare_batch(self, state: Any, micro: list, step: int) -> list:
        return super().prepare_batch({"params": state["params"]["decoder"]}, micro, step)


