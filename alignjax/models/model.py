"""``Model``: the public face of the decoder (config + params + pure apply functions)."""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignjax.models.config import ModelConfig
from alignjax.models.transformer import Decoder, dense, fit_spec, mixed_precision_logits
from alignjax.sharding import normalize_mesh, rules_from_config, tree_shardings

Array = jax.Array
Params = Any


@functools.lru_cache(maxsize=32)
def _jitted_init(config: ModelConfig, mesh: Mesh | None, rules: tuple) -> Any:
    """One compiled init per (config, mesh, rules), so repeated ``from_pretrained(preset)`` is cheap."""
    model = Model(config, mesh=mesh, rules=rules)
    fn = lambda r: nn.unbox(model._boxed_init(r))
    return jax.jit(fn) if mesh is None else jax.jit(fn, out_shardings=model.shardings())


class Model:
    """A decoder-only LM. All methods are pure in ``params``; jit them at the call site.

    Conventions: ``input_ids``/``positions``/``segment_ids``/``branch_ids`` are int32 [B, T];
    logits are float32 [B, T, V]; ``hidden`` is the final normed hidden state [B, T, D] in the
    compute dtype, and ``logits == hidden @ unembedding(params)``.

    ``mesh``/``rules`` (optional) turn on activation sharding constraints inside the network and
    give ``init`` and ``init_cache`` their output shardings.
    """

    def __init__(
        self,
        config: ModelConfig,
        params: Params | None = None,
        *,
        mesh: Mesh | None = None,
        rules: Any = None,
    ) -> None:
        self.config = config
        self.params = params
        self.mesh = normalize_mesh(mesh)  # a jax.make_mesh mesh (Explicit axes) becomes Auto
        self.rules = rules_from_config(rules)
        self.module = Decoder(config, self.mesh, self.rules)
        self._logical_axes = None

    def __repr__(self) -> str:
        return (
            f"Model({self.config}, params={'loaded' if self.params is not None else None}, mesh={self.mesh})"
        )

    # ---- parameters -------------------------------------------------------------------------

    def _dummy(self) -> tuple[Array, ...]:
        ids = jnp.zeros((1, 1), jnp.int32)
        return ids, ids, jnp.ones_like(ids), ids

    def _boxed_init(self, rng: Array) -> Any:
        return self.module.init(rng, *self._dummy())["params"]

    @property
    def logical_axes(self) -> Params:
        """Pytree matching ``params`` whose leaves are tuples of logical axis names."""
        if self._logical_axes is None:
            boxed = jax.eval_shape(self._boxed_init, jax.random.PRNGKey(0))
            specs = nn.get_partition_spec(boxed)
            self._logical_axes = jax.tree.map(
                lambda s: tuple(s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
            )
        return self._logical_axes

    def abstract_params(self) -> Params:
        """ShapeDtypeStructs of the params (no memory)."""
        return jax.eval_shape(lambda r: nn.unbox(self._boxed_init(r)), jax.random.PRNGKey(0))

    def shardings(self, mesh: Mesh | None = None, rules: Any = None) -> Params:
        """Pytree of NamedSharding matching ``params`` (``rules`` default: this model's rules)."""
        mesh = mesh if mesh is not None else self.mesh
        if mesh is None:
            raise ValueError("Model.shardings needs a mesh (none given and the model has none)")
        rules = self.rules if rules is None else rules_from_config(rules)
        return tree_shardings(mesh, self.logical_axes, rules)

    def init(self, rng: Array) -> Params:
        """Random params (normal(0.02) kernels, unit norms, zero biases), sharded if a mesh is set."""
        return _jitted_init(self.config, self.mesh, self.rules)(rng)

    # ---- forward ------------------------------------------------------------------------------

    def _defaults(self, input_ids, positions, segment_ids, branch_ids):
        chex.assert_rank(input_ids, 2)
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        chex.assert_shape([positions, segment_ids], (B, T))
        if branch_ids is not None:  # None reaches the decoder: no branches, known at trace time
            chex.assert_shape(branch_ids, (B, T))
        return input_ids, positions, segment_ids, branch_ids

    def hidden(
        self,
        params: Params,
        input_ids: Array,
        *,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        branch_ids: Array | None = None,
        dropout_rng: Array | None = None,
    ) -> Array:
        """Final normed hidden state [B, T, D] (positions default to arange, segments to all ones);
        ``dropout_rng`` turns on LoRA dropout (the training forward), else it is off."""
        args = self._defaults(input_ids, positions, segment_ids, branch_ids)
        rngs = None if dropout_rng is None else {"dropout": dropout_rng}
        hidden, _ = self.module.apply({"params": params}, *args, rngs=rngs)
        return hidden

    def unembedding(self, params: Params) -> Array:
        """[D, V]: the lm_head kernel, or the tied embedding transposed."""
        if self.config.tie_word_embeddings:
            return params["embedding"].T
        return params["lm_head"]

    def logits_from_hidden(self, params: Params, hidden: Array) -> Array:
        """hidden [B, T, D] @ unembedding [D, V] -> float32 logits [B, T, V]."""
        w = self.unembedding(params)
        if hidden.dtype == jnp.float32:
            # Why ``dense``: with a plain einsum XLA:CPU computes dW = h^T dlogits with the [B T, V]
            # logits cotangent transposed, a strided copy of the step's largest array;
            # ``dense``'s CPU gradient transposes the small h instead (docs/benchmarks.md).
            logits = dense(hidden, w.astype(jnp.float32), 1)
        else:  # bf16/fp16 compute: fp32 logits, and a backward in the compute dtype
            logits = mixed_precision_logits(hidden, w)
        if self.mesh is not None:
            spec = fit_spec(logits.shape, ("batch", "length", "act_vocab"), self.mesh, self.rules)
            logits = jax.lax.with_sharding_constraint(logits, NamedSharding(self.mesh, spec))
        return logits

    def apply(
        self,
        params: Params,
        input_ids: Array,
        *,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        branch_ids: Array | None = None,
        dropout_rng: Array | None = None,
    ) -> Array:
        """Logits [B, T, V] (float32). See ``Decoder`` for the masking rule; ``dropout_rng`` as
        :meth:`hidden`."""
        hidden = self.hidden(
            params, input_ids, positions=positions, segment_ids=segment_ids, branch_ids=branch_ids,
            dropout_rng=dropout_rng,
        )
        return self.logits_from_hidden(params, hidden)

    __call__ = apply

    # ---- KV-cache decoding --------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> dict:
        """Zeroed key/value buffers {layers_i: {k, v}} of shape [B, max_length, K, Dh]; with
        ``scan_layers`` one stack {layers: {k, v}} of shape [L, B, max_length, K, Dh]."""
        cfg = self.config
        shape = (batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
        axes: tuple[str | None, ...] = ("batch", "length", "act_kv_heads", None)
        dtype = jnp.dtype(dtype or cfg.dtype)
        if cfg.scan_layers:
            shape, axes = (cfg.num_layers, *shape), ("layers", *axes)

        def make():
            kv = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            if cfg.scan_layers:
                return {"layers": kv()}
            return {f"layers_{i}": kv() for i in range(cfg.num_layers)}

        if self.mesh is None:
            return make()
        sharding = NamedSharding(self.mesh, fit_spec(shape, axes, self.mesh, self.rules))
        return jax.jit(make, out_shardings=sharding)()

    def repeat_cache_rows(self, cache: dict, repeats: int) -> dict:
        """Each cache row repeated ``repeats`` times (row i -> rows i r .. i r + r - 1), along the
        batch axis of either layout (axis 1 of a scanned cache's [L, B, S, K, Dh])."""
        axis = 1 if self.config.scan_layers else 0
        return jax.tree.map(lambda x: jnp.repeat(x, repeats, axis=axis), cache)

    def decode(
        self, params: Params, input_ids: Array, cache: dict, *, positions: Array
    ) -> tuple[Array, dict]:
        """Runs t new tokens [B, t] at ``positions`` [B, t] against the cache.

        Writes their keys/values into slots ``positions`` and attends each token to slots
        <= its position; returns (float32 logits [B, t, V], updated cache). A prompt prefill is
        one call with t = prompt length (right-padded prompts: give pad tokens positions at or
        past their row's length; later tokens overwrite those slots).
        """
        chex.assert_rank([input_ids, positions], 2)
        chex.assert_equal_shape([input_ids, positions])
        ones = jnp.ones_like(input_ids)
        hidden, cache = self.module.apply(
            {"params": params}, input_ids, positions, ones, jnp.zeros_like(input_ids), cache
        )
        return self.logits_from_hidden(params, hidden), cache
