"""``RewardModel``: the shared decoder plus a head; params ``{"decoder": ..., "head": ...}``.

It has the interface the train loop uses of a model (``config`` a dataclass, ``mesh``, ``rules``,
``init``, ``shardings``, ``logical_axes``), so ``alignjax.train.loop.run_train`` trains it unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from alignjax.models import Model, ModelConfig
from alignjax.models.heads import (
    HeadConfig,
    gather_tokens,
    last_token_index,
    make_head,
    prompt_token_index,
)
from alignjax.sharding import rules_from_config, tree_shardings
from alignjax.train.loop import build_model

Array = jax.Array
Params = Any


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    decoder: ModelConfig
    head: HeadConfig

    @property
    def dtype(self) -> str:
        """The compute dtype (the decoder's): what the programs built on the model compile for."""
        return self.decoder.dtype


class RewardModel:
    """Decoder + head. ``outputs(params, batch, num_sequences)`` gives the head's per-sequence values."""

    def __init__(self, decoder: Model, head: HeadConfig) -> None:
        self.decoder = decoder
        self.head_config = head
        self.head = make_head(head)
        self.config = RewardModelConfig(decoder.config, head)
        self.mesh = decoder.mesh
        self.rules = decoder.rules
        self.params: Params | None = None
        self._logical_axes = None

    def __repr__(self) -> str:
        return f"RewardModel({self.config})"

    # ---- parameters
    def _boxed_head_init(self, rng: Array) -> Any:
        feats = jnp.zeros((1, self.decoder.config.hidden_size), jnp.float32)
        return self.head.init(rng, feats)["params"]

    def init_head(self, rng: Array) -> Params:
        return nn.unbox(self._boxed_head_init(rng))

    def init(self, rng: Array) -> Params:
        r_dec, r_head = jax.random.split(rng)
        return {"decoder": self.decoder.init(r_dec), "head": self.init_head(r_head)}

    @property
    def logical_axes(self) -> Params:
        if self._logical_axes is None:
            boxed = jax.eval_shape(self._boxed_head_init, jax.random.PRNGKey(0))
            specs = nn.get_partition_spec(boxed)
            head = jax.tree.map(lambda s: tuple(s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
            self._logical_axes = {"decoder": self.decoder.logical_axes, "head": head}
        return self._logical_axes

    def shardings(self, mesh: Mesh | None = None, rules: Any = None) -> Params:
        mesh = mesh if mesh is not None else self.mesh
        if mesh is None:
            raise ValueError("RewardModel.shardings needs a mesh")
        rules = self.rules if rules is None else rules_from_config(rules)
        return tree_shardings(mesh, self.logical_axes, rules)

    # ---- forward
    def pooled(self, params: Params, batch: Mapping[str, Array], num_sequences: int) -> tuple[Array, Array]:
        """(last completion token hidden [N, D], last prompt token hidden [N, D]) in fp32."""
        kwargs = dict(positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
        if batch.get("branch_ids") is not None:
            kwargs["branch_ids"] = batch["branch_ids"]
        hidden = self.decoder.hidden(params["decoder"], batch["input_ids"], **kwargs).astype(jnp.float32)
        last = last_token_index(batch["loss_mask"], batch["example_ids"], num_sequences)
        prompt = prompt_token_index(batch["loss_mask"], batch["example_ids"], num_sequences)
        return gather_tokens(hidden, last), gather_tokens(hidden, prompt)

    def outputs(self, params: Params, batch: Mapping[str, Array], num_sequences: int) -> dict[str, Any]:
        """Per-sequence head outputs for sequences ``0..N-1`` of a sequence batch.

        value: ``{"rewards": [N, K]}``; gpm: ``{"embeddings": [N, 2k], "scales": [N, k] or None}``;
        pal: ``{"features": [N, d], "prototypes": [K, d], "user_logits": [U, K], "scale": []}``.
        """
        feats, prompt_feats = self.pooled(params, batch, num_sequences)
        head = {"params": params["head"]}
        kind = self.head_config.kind
        if kind == "value":
            return {"rewards": self.head.apply(head, feats)}
        if kind == "gpm":
            v, scales = self.head.apply(head, feats, prompt_feats)
            return {"embeddings": v, "scales": scales}
        return self.head.apply(head, feats)

    def rewards(self, params: Params, input_ids: Array, *, pad_id: int) -> Array:
        """Value-head rewards [B] (head 0) of right-padded rows ``input_ids`` [B, T], read at the last
        non-pad token of each row: the convention of HF ``*ForSequenceClassification``."""
        ids = jnp.asarray(input_ids, jnp.int32)
        nonpad = (ids != pad_id).astype(jnp.float32)
        b = ids.shape[0]
        batch = {
            "input_ids": ids,
            "segment_ids": jnp.ones_like(ids),
            "loss_mask": nonpad,
            "example_ids": jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], ids.shape),
        }
        return self.outputs(params, batch, b)["rewards"][:, 0]


def build_reward_model(
    model_config: Any, head: HeadConfig, mesh: Mesh, rules: Any, vocab_size: int = 0, rng: Array | None = None
) -> tuple[RewardModel, Params | None]:
    """``(reward_model, init_params or None)`` from ``config.model`` (a preset or an HF directory).

    A pretrained decoder gets a freshly initialised head (``rng``, default key 0); a preset returns
    None and the train loop initialises everything from ``config.seed``.
    """
    decoder, pretrained = build_model(model_config, mesh, rules, vocab_size)
    rm = RewardModel(decoder, head)
    if pretrained is None:
        return rm, None
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return rm, {"decoder": pretrained, "head": rm.init_head(rng)}
