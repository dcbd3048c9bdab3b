"""Optimiser from config, with Hugging Face Trainer's semantics (the optimiser TRL's DPOTrainer uses).

``config.optim`` -> ``optax.chain(clip, adamw)`` and the learning-rate schedule. Each convention is
HF's (``transformers`` 5.x ``Trainer``, ``torch.optim.AdamW``, ``get_scheduler``), so a run and a
TRL run on the same model, data and settings take the same steps (tests/train/test_trl_parity.py):

* **Weight-decay mask** (:func:`decay_mask`): ``Trainer.get_decay_parameter_names`` decays every
  parameter except biases and the weights of normalisation layers -- names matching ``bias``,
  ``layernorm``, ``rmsnorm``, ``(^|.)norm($|.)`` or ``_norm($|.)``, and parameters of ``nn.LayerNorm``
  modules. Embeddings and the LM head *are* decayed. alignjax's Flax paths mirror HF's module names
  (``layers_0.input_layernorm.scale``, ``norm.scale``, ``self_attn.q_norm.scale``,
  ``self_attn.q_proj.bias``), so HF's patterns are applied to them as they are; a leaf named
  ``scale`` (Flax's name for a norm's weight) is excluded too, standing in for HF's by-type rule.
* **AdamW** (``optax.adamw``, equal to ``torch.optim.AdamW``): ``m_hat = m / (1 - b1^t)``,
  ``v_hat = v / (1 - b2^t)`` with ``t`` counting from 1, update ``m_hat / (sqrt(v_hat) + eps)`` (eps
  outside the square root, after bias correction), decay decoupled and multiplied by the learning
  rate: ``p <- p - lr (update + wd p)``, i.e. torch's ``p <- p (1 - lr wd)`` then the Adam step.
* **Clipping** (:func:`clip_by_global_norm_like_torch`): before the optimiser, on the global L2 norm
  of all gradients, as ``torch.nn.utils.clip_grad_norm_``: ``g <- g min(1, max_norm / (norm + 1e-6))``
  (optax's own clip has no ``1e-6``). The logged ``grad_norm`` is the norm before clipping, as HF's.
* **Schedule** (:func:`make_schedule`): the learning rate of the optimiser step that sees ``s``
  earlier steps (``s = 0`` for the first), which is HF's ``lr_lambda(s)``: linear warmup
  ``lr s / warmup`` (so the first step has lr 0 when ``warmup_steps > 0``, as in HF), then cosine
  (``get_cosine_schedule_with_warmup``; with ``end_learning_rate_factor`` > 0,
  ``cosine_with_min_lr``'s ``min_lr_rate``) or linear (``get_linear_schedule_with_warmup``) decay
  over ``max(1, num_steps - warmup)`` steps, or constant. The logged ``learning_rate`` is that step's
  lr, as HF 5.x logs it (read before ``lr_scheduler.step()``).

Gradient accumulation is not an optimiser wrapper here: the train step scans over
``config.optim.grad_accum_steps`` micro-batches and averages their gradients, so one optimiser
update sees the full-batch gradient (see :func:`alignjax.train.step.make_train_step`).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")

# transformers Trainer.get_decay_parameter_names, matched against the lower-cased dotted name.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
_NO_DECAY = [re.compile(p) for p in NO_DECAY_PATTERNS]
TORCH_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)


def path_name(path: tuple[Any, ...]) -> str:
    """A params-tree key path as HF-style dotted name: ``layers_0.self_attn.q_proj.bias``."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def decays(name: str) -> bool:
    """Whether HF's Trainer decays the parameter ``name`` (dotted; see the module docstring)."""
    lowered = name.lower()
    if lowered.rsplit(".", 1)[-1] == "scale":
        return False
    return not any(p.search(lowered) for p in _NO_DECAY)


def decay_mask(params: Any) -> Any:
    """The pytree of ``params`` with ``True`` where weight decay applies (optax ``mask``)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path_name(path)), params)


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """``g * min(1, max_norm / (||g||_2 + 1e-6))`` over all leaves: ``torch.nn.utils.clip_grad_norm_``."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + TORCH_CLIP_EPS))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_schedule(optim: Any, num_steps: int) -> optax.Schedule:
    """Learning rate of the step after ``s`` updates: linear warmup 0 -> lr over ``warmup_steps``, then
    decay to ``lr * end_learning_rate_factor`` at ``num_steps`` (cosine or linear), or constant."""
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"config.optim.schedule={optim.schedule!r}; choose one of {list(SCHEDULES)}")
    lr = float(optim.learning_rate)
    warmup = int(optim.warmup_steps)
    end = lr * float(optim.end_learning_rate_factor)
    decay_steps = max(1, int(num_steps) - warmup)  # HF: max(1, num_training_steps - num_warmup_steps)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(optim: Any, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` from ``config.optim`` (name ``adamw`` or ``sgd``); ``grad_clip_norm`` 0 = no
    clipping (HF's ``max_grad_norm``)."""
    schedule = make_schedule(optim, num_steps)
    if optim.name == "adamw":
        core = optax.adamw(
            schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        )
    elif optim.name == "sgd":
        core = optax.sgd(schedule)
    else:
        raise ValueError(f"config.optim.name={optim.name!r}; choose one of ['adamw', 'sgd']")
    parts = [clip_by_global_norm_like_torch(optim.grad_clip_norm)] if optim.grad_clip_norm > 0 else []
    return optax.chain(*parts, core), schedule
