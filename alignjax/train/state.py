"""The train state and its shardings: built abstractly first (``jax.eval_shape``), then initialised
or restored directly into its shardings (``jit(init, out_shardings)``), so no host ever holds it.

``{"params", "opt_state", "step", "rng"}`` plus ``ref_params`` when the state keeps a reference copy
(:func:`alignjax.train.reference.keeps_copy`) and ``loss_state`` for a stateful loss. With LoRA the
optimiser state covers the trainable part only and a checkpoint holds only that part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from alignjax import sharding
from alignjax.models import lora
from alignjax.train import checkpoint as ckpt
from alignjax.train import reference as reflib

State = dict[str, Any]


@dataclasses.dataclass
class StateLayout:
    """How to make the state: ``init(rng, params, ref) -> state``, its ``shardings``, ``abstract``
    shapes and the checkpoint ``manifest``; :meth:`fresh` builds it on the mesh."""

    init: Callable[[jax.Array, Any, Any], State]
    shardings: State
    abstract: State
    manifest: dict[str, Any]
    rng: jax.Array
    init_params: Any
    ref_params: Any

    def fresh(self) -> State:
        return jax.jit(self.init, out_shardings=self.shardings)(self.rng, self.init_params, self.ref_params)


def state_layout(
    model: Any,
    tx: optax.GradientTransformation,
    *,
    rules: Any,
    seed: int,
    init_params: Any,
    ref_params: Any,
    keep_ref: bool,
    sync_every: int,
    loss_state: Any,
) -> StateLayout:
    """The layout of a run's state (module docstring); ``init_params`` None = ``model.init``."""
    mesh = model.mesh
    param_shardings = model.shardings(mesh, rules)
    repl = sharding.replicated(mesh)

    def init(rng: jax.Array, params: Any, ref: Any) -> State:
        init_rng, rng = jax.random.split(rng)
        params = model.init(init_rng) if params is None else params
        opt_state = tx.init(lora.trainable_part(params))  # LoRA: the adapters' moments only
        state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32), "rng": rng}
        if keep_ref:
            ref_dtype = None if sync_every else model.config.dtype  # see reflib.stored_reference
            state["ref_params"] = reflib.stored_reference(params if ref is None else ref, ref_dtype)
        if loss_state is not None:
            state["loss_state"] = loss_state
        return state

    rng = jax.random.PRNGKey(seed)
    abstract = jax.eval_shape(init, rng, init_params, ref_params)
    shardings = {
        "params": param_shardings,
        "opt_state": optax.tree_map_params(
            tx,
            lambda _, s: s,
            abstract["opt_state"],
            lora.trainable_part(param_shardings),
            transform_non_params=lambda _: repl,
        ),
        "step": repl,
        "rng": repl,
    }
    if keep_ref:
        shardings["ref_params"] = param_shardings
    if loss_state is not None:
        shardings["loss_state"] = jax.tree.map(lambda _: repl, abstract["loss_state"])
    manifest = ckpt.shape_manifest(abstract, dataclasses.asdict(model.config))
    return StateLayout(init, shardings, abstract, manifest, rng, init_params, ref_params)


def restore_or_init(
    layout: StateLayout, checkpointer: ckpt.Checkpointer, data: Any, writer: Any
) -> tuple[int, State]:
    """``(start step, state)``: the newest checkpoint that restores (damaged ones are moved aside; one
    of another model is refused before any array is read), with the data iterator and metrics file
    put back to its step; else a fresh state and an empty metrics file."""
    restored = checkpointer.restore_latest(
        ckpt.abstract_with_shardings(layout.abstract, layout.shardings), layout.manifest
    )
    if restored is None:
        writer.reset()
        return 0, layout.fresh()
    start, state, data_state = restored
    state = checkpointer.with_frozen(state, layout.fresh)  # LoRA: the frozen base rebuilt as at the start
    data.set_state(data_state)
    writer.truncate_after(start)
    return start, state
