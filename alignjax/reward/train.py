"""Reward-model training through the shared train loop (``alignjax.train.loop.run_train``).

The loop is reused unchanged; what differs from preference training is the *objective*: the forward
(decoder + head, :class:`alignjax.reward.model.RewardModel`) and the loss on its outputs. That is
packaged as :class:`RewardObjective`, which supplies the callables the loop takes from
``alignjax.train.step`` (``make_step_spec``, ``make_train_step``, ``make_eval_fn``, ``evaluate``) and
the FLOP accounting of its throughput metrics (``model_flops``).
``make_train_step`` is ``alignjax.train.step.make_train_step`` itself (grad accumulation, NaN checks,
optimizer) with this module's loss function in place of the log-prob one.

Objectives (``config.reward.objective``), each a registered loss of :mod:`alignjax.losses.reward`:

* ``bt``: ``bradley_terry`` on value-head rewards (``label_smoothing``, ``center_rewards_coefficient``,
  the row's ``margin`` with ``config.reward.use_margin``); with ``config.reward.num_heads = K > 1`` it
  trains an ensemble of K value heads (the mean of their losses).
* ``secrets``: ``secrets_rm`` with the row's ensemble strength in ``margin`` (see
  :mod:`alignjax.reward.secrets`, which runs the whole Secrets-II pipeline).
* ``gpm``: ``gpm`` on the GPM head's embeddings (and prompt scales), ``tau``.
* ``pal``: ``pal`` on the PAL head (learned scale; the row's ``user_id`` selects the user).

A row's ``weight`` multiplies its loss. Metrics (per step): ``loss``, ``accuracy``,
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (GPM: the chosen side's "reward" is
s(y_w > y_l), the rejected side's s(y_l > y_w) = -s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import alignjax.losses as losses
from alignjax import flops, sharding
from alignjax.data import resolve_tokenizer
from alignjax.losses import reward as reward_losses
from alignjax.models.heads import HeadConfig
from alignjax.reward.model import RewardModel, build_reward_model
from alignjax.train import loop
from alignjax.train import step as steplib
from alignjax.train.result import TrainResult

Array = jax.Array

# objective -> (registered loss, head kind)
OBJECTIVES: dict[str, tuple[str, str]] = {
    "bt": ("bradley_terry", "value"),
    "secrets": ("secrets_rm", "value"),
    "gpm": ("gpm", "gpm"),
    "pal": ("pal", "pal"),
}
# Hyperparameters the head supplies (not config.loss keys).
_HEAD_SUPPLIED = {"pal": ("scale",)}


def check_objective(objective: str) -> tuple[str, str]:
    if objective not in OBJECTIVES:
        raise ValueError(f"config.reward.objective={objective!r}; valid objectives: {sorted(OBJECTIVES)}")
    return OBJECTIVES[objective]


def head_config(config: Any) -> HeadConfig:
    """HeadConfig from ``config.reward`` (the head kind follows the objective)."""
    r = config.reward
    _, kind = check_objective(r.objective)
    return HeadConfig(
        kind=kind,
        num_heads=int(r.num_heads) if kind == "value" else 1,
        gpm_dim=int(r.gpm_dim),
        gpm_prompt_scales=bool(r.gpm_prompt_scales),
        gpm_normalize=bool(r.get("gpm_normalize", True)),
        pal_dim=int(r.pal_dim),
        pal_prototypes=int(r.pal_prototypes),
        pal_users=int(r.pal_users),
    )


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """Static description of a reward-model step (the counterpart of ``alignjax.train.step.StepSpec``)."""

    objective: str
    loss: str
    hyperparameters: tuple[tuple[str, Any], ...]
    batch_size: int  # pairs per micro-batch (global)
    use_margin: bool = False
    kind: str = "pairwise"
    reference: str = "none"
    nan_at_step: int = -1

    @property
    def num_sequences(self) -> int:
        return 2 * self.batch_size

    @property
    def stateful(self) -> bool:
        return False


def make_reward_spec(config: Any, batch_size: int, reference: str = "none") -> RewardSpec:
    """RewardSpec from ``config.reward.objective`` and ``config.loss``; a key the loss does not take
    is an error naming it."""
    loss_name, _ = check_objective(config.reward.objective)
    if losses.canonical(config.loss.name) != loss_name:
        raise ValueError(
            f"config.loss.name={config.loss.name!r} does not match config.reward.objective="
            f"{config.reward.objective!r} (which trains {loss_name!r})"
        )
    if config.data.kind != "pairwise":
        raise ValueError(f"config.data.kind={config.data.kind!r}: reward models train on pairwise data")
    spec = losses.spec(loss_name)
    supplied = _HEAD_SUPPLIED.get(config.reward.objective, ())
    hyper = {}
    for key, value in config.loss.items():
        if key in ("name", "nll_weight", "weights", "module"):
            continue
        if key not in spec.hyperparameters or key in supplied:
            valid = sorted(k for k in spec.hyperparameters if k not in supplied)
            raise ValueError(
                f"config.loss.{key}: objective {config.reward.objective!r} ({loss_name}) has no "
                f"hyperparameter {key!r}; its hyperparameters: {valid}"
            )
        hyper[key] = value
    if float(config.loss.get("nll_weight") or 0.0):
        raise ValueError("config.loss.nll_weight: reward models have no language-model loss; set it to 0")
    return RewardSpec(
        objective=config.reward.objective,
        loss=loss_name,
        hyperparameters=tuple(sorted(hyper.items())),
        batch_size=int(batch_size),
        use_margin=bool(config.reward.use_margin),
        nan_at_step=int(config.get("train", {}).get("nan_at_step", -1)),
    )


# ------------------------------------------------------------------------------------------ forward + loss


def pair_outputs(
    model: RewardModel, params: Any, batch: Mapping[str, Array], spec: RewardSpec
) -> dict[str, Array]:
    """Loss inputs of B pairs (sequences 0..B-1 chosen, B..2B-1 rejected) plus ``chosen_rewards`` /
    ``rejected_rewards`` [B] (the pair's two sides, for metrics) and ``scores`` [B] (> 0: chosen wins)."""
    b = spec.batch_size
    out = model.outputs(params, batch, spec.num_sequences)
    kind = model.head_config.kind
    if kind == "value":
        rewards = out["rewards"]  # [2B, K]
        c, r = rewards[:b], rewards[b : 2 * b]
        cm, rm = jnp.mean(c, axis=-1), jnp.mean(r, axis=-1)
        return {
            "chosen_all": c,
            "rejected_all": r,
            "chosen_rewards": cm,
            "rejected_rewards": rm,
            "scores": cm - rm,
        }
    if kind == "gpm":
        v = out["embeddings"]
        scales = None if out["scales"] is None else out["scales"][:b]  # the prompt's scales (same prompt)
        s = reward_losses.gpm_score(v[:b], v[b : 2 * b], scales=scales)
        return {
            "chosen_embeddings": v[:b],
            "rejected_embeddings": v[b : 2 * b],
            "scales": scales,
            "chosen_rewards": s,
            "rejected_rewards": -s,
            "scores": s,
        }
    users = batch.get("user_id")
    users = jnp.zeros((b,), jnp.int32) if users is None else users
    user_logits = jnp.take(out["user_logits"], users, axis=0)  # [B, K]
    ideal = reward_losses.pal_ideal_point(user_logits, out["prototypes"])
    f = out["features"]
    rw = reward_losses.pal_reward(f[:b], ideal, scale=1.0) * out["scale"]
    rl = reward_losses.pal_reward(f[b : 2 * b], ideal, scale=1.0) * out["scale"]
    return {
        "chosen_features": f[:b],
        "rejected_features": f[b : 2 * b],
        "user_logits": user_logits,
        "prototypes": out["prototypes"],
        "scale": out["scale"],
        "chosen_rewards": rw,
        "rejected_rewards": rl,
        "scores": rw - rl,
    }


def per_example_loss(spec: RewardSpec, inputs: Mapping[str, Array], batch: Mapping[str, Array]) -> Array:
    """[B] losses of the objective (before the row weights)."""
    hyper = dict(spec.hyperparameters)
    fn = losses.get(spec.loss)
    if spec.objective == "bt":
        margin = None
        if spec.use_margin:
            if "margin" not in batch:
                raise ValueError("config.reward.use_margin=True but the data rows carry no 'margin' field")
            margin = batch["margin"]
        c, r = inputs["chosen_all"], inputs["rejected_all"]
        per_head = [fn(c[:, k], r[:, k], margin, **hyper) for k in range(c.shape[1])]
        return jnp.mean(jnp.stack(per_head), axis=0)
    if spec.objective == "secrets":
        if "margin" not in batch:
            raise ValueError(
                "objective 'secrets' reads each pair's ensemble preference strength from the row's 'margin' "
                "field, which this data lacks: run the Secrets-II pipeline "
                "(alignjax.reward.secrets.run_secrets, "
                "experiments/reward_model.py:objective=secrets), which writes it"
            )
        return fn(inputs["chosen_all"][:, 0], inputs["rejected_all"][:, 0], batch["margin"], **hyper)
    if spec.objective == "gpm":
        return fn(inputs["chosen_embeddings"], inputs["rejected_embeddings"], inputs["scales"], **hyper)
    return fn(
        inputs["chosen_features"],
        inputs["rejected_features"],
        inputs["user_logits"],
        inputs["prototypes"],
        scale=inputs["scale"],
    )


def make_reward_loss_fn(
    model: RewardModel, spec: RewardSpec
) -> Callable[..., tuple[Array, tuple[dict, Any]]]:
    """``loss_fn(params, ref_params, loss_state, batch) -> (loss, (metrics, None))``: the signature of
    ``alignjax.train.step.make_loss_fn``'s function (``ref_params``/``loss_state`` are unused)."""

    def loss_fn(params: Any, ref_params: Any, loss_state: Any, batch: Mapping[str, Array]):
        inputs = pair_outputs(model, params, batch, spec)
        per_example = per_example_loss(spec, inputs, batch).astype(jnp.float32)
        if "weight" in batch:
            per_example = per_example * batch["weight"].astype(jnp.float32)
        loss = jnp.mean(per_example)
        c, r = inputs["chosen_rewards"], inputs["rejected_rewards"]
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean((inputs["scores"] > 0).astype(jnp.float32)),
            "rewards/chosen": jnp.mean(c),
            "rewards/rejected": jnp.mean(r),
            "rewards/margins": jnp.mean(c - r),
        }
        return loss, (metrics, None)

    return loss_fn


def make_reward_train_step(
    model: RewardModel, spec: RewardSpec, tx: Any, schedule: Any, **kwargs: Any
) -> Callable:
    """``alignjax.train.step.make_train_step`` with the reward loss function.

    """
    loss_fn = make_reward_loss_fn(model, spec)
    return steplib.make_train_step(model, spec, tx, schedule, loss_fn=loss_fn, **kwargs)


def make_reward_eval_fn(
    model: RewardModel, spec: RewardSpec
) -> Callable[[Any, Any, Mapping[str, Array]], dict]:
    """``eval(params, ref_params, batch) -> {scores, chosen_rewards, rejected_rewards}`` ([B] each)."""

    def evaluate(params: Any, ref_params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
        out = pair_outputs(model, params, batch, spec)
        return {k: out[k] for k in ("scores", "chosen_rewards", "rejected_rewards")}

    return evaluate


def evaluate_reward(
    eval_fn: Any, params: Any, ref_params: Any, batches: list, beta: float = 1.0
) -> dict[str, float]:
    """Held-out pair accuracy (score > 0; ties wrong) and mean reward margin."""
    from jax.experimental import multihost_utils

    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        for k, v in eval_fn(params, ref_params, batch).items():
            parts.setdefault(k, []).append(np.asarray(multihost_utils.process_allgather(v, tiled=True)))
    vals = {k: np.concatenate(v) for k, v in parts.items()}
    return {
        "eval/accuracy": float(np.mean(vals["scores"] > 0)),
        "eval/rewards/margins": float(np.mean(vals["chosen_rewards"] - vals["rejected_rewards"])),
    }


class RewardObjective:
    """The loop hook: what ``run_train`` takes from ``alignjax.train.step`` for preference losses."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def make_step_spec(self, config: Any, batch_size: int, reference: str) -> RewardSpec:
        return make_reward_spec(config, batch_size, reference)

    make_train_step = staticmethod(make_reward_train_step)
    make_eval_fn = staticmethod(make_reward_eval_fn)
    evaluate = staticmethod(evaluate_reward)

    @staticmethod
    def model_flops(model: Any, spec: RewardSpec, host: Mapping[str, Any]) -> float:
        """The decoder's forward + backward without the language-model head (the reward head's
        few FLOPs are not counted); no reference."""
        return flops.step_flops(model.decoder.config, host, reference_forward=False, lm_head=False)["total"]


# ------------------------------------------------------------------------------------------ one run


def check_config(config: Any) -> None:
    """Names a user can mistype, before any compute."""
    if "reward" not in config:
        raise ValueError("config has no 'reward' section: use experiments/reward_model.py")
    check_objective(config.reward.objective)
    head_config(config)
    if config.reference.kind not in ("none", "frozen"):
        raise ValueError(f"config.reference.kind={config.reference.kind!r}: reward models use no reference")


def train_reward_model(config: Any, workdir: str) -> TrainResult:
    """One training run of ``config.reward.objective`` in ``workdir`` (resumable); returns the loop's
    result."""
    check_config(config)
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = sharding.rules_from_config(config.rules or None)
    vocab = resolve_tokenizer(config.data.tokenizer).vocab_size
    model, init_params = build_reward_model(
        config.model, head_config(config), mesh, rules, vocab, rng=jax.random.PRNGKey(config.seed + 1)
    )
    return loop.run_train(
        config, workdir, model=model, init_params=init_params, objective=RewardObjective(config)
    )


