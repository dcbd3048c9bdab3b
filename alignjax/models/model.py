"""``Model``: the public face of the decoder (config + params + pure apply functions)."""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignjax.models.config import AUX_HEADS, ModelConfig
from alignjax.models.heads import AuxHeads
from alignjax.models.transformer import Decoder, dense, fit_spec, mixed_precision_logits
from alignjax.sharding import normalize_mesh, rules_from_config, tree_shardings

Array = jax.Array
Params = Any


def decoder_params(params: Params) -> Params:
    """The decoder's own params: ``params`` without the aux heads beside them."""
    return {k: v for k, v in params.items() if k != AUX_HEADS}


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

    Args:
      config: the :class:`~alignjax.models.ModelConfig`.
      params: params to carry along (``from_pretrained`` sets them); None = none.
      mesh: a ``(data, fsdp, tensor)`` mesh (a ``jax.make_mesh`` mesh with those axes works too).
      rules: logical-axis rules; None = ``alignjax.sharding.DEFAULT_RULES``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from alignjax.models import Model, ModelConfig
      >>> config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
      ...                      num_kv_heads=1, head_dim=8, intermediate_size=32)
      >>> model = Model(config)
      >>> params = model.init(jax.random.PRNGKey(0))
      >>> input_ids = jnp.array([[1, 5, 6, 2]])
      >>> logits = jax.jit(model.apply)(params, input_ids)
      >>> logits.shape, logits.dtype
      ((1, 4, 32), dtype('float32'))
      >>> hidden = jax.jit(model.hidden)(params, input_ids)
      >>> hidden.shape, model.unembedding(params).shape
      ((1, 4, 16), (16, 32))
      >>> bool(jnp.allclose(model.logits_from_hidden(params, hidden), logits, atol=1e-5))
      True
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
        params = self.module.init(rng, *self._dummy())["params"]
        if self.config.aux_heads:
            params = {**params, AUX_HEADS: self.init_aux_heads(jax.random.fold_in(rng, 1), boxed=True)}
        return params

    def init_aux_heads(self, rng: Array, *, boxed: bool = False) -> Params:
        """Fresh params of the ``aux_heads`` classifiers alone (a loaded checkpoint has none)."""
        features = jnp.zeros((1, self.config.hidden_size), jnp.float32)
        params = AuxHeads(self.config.aux_heads).init(rng, features)["params"]
        return params if boxed else nn.unbox(params)

    @property
    def logical_axes(self) -> Params:
        """Pytree matching ``params`` whose leaves are tuples of logical axis names.

        Returns:
          A pytree matching the params, e.g. ``("vocab", "embed")`` for the embedding.

        Examples:
          >>> import jax
          >>> import jax.numpy as jnp
          >>> from alignjax.models import Model, ModelConfig
          >>> config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
          ...                      num_kv_heads=1, head_dim=8, intermediate_size=32)
          >>> model = Model(config)
          >>> model.logical_axes["embedding"], model.logical_axes["layers_0"]["mlp"]["up_proj"]["kernel"]
          (('vocab', 'embed'), ('embed', 'mlp'))
        """
        if self._logical_axes is None:
            boxed = jax.eval_shape(self._boxed_init, jax.random.PRNGKey(0))
            specs = nn.get_partition_spec(boxed)
            self._logical_axes = jax.tree.map(
                lambda s: tuple(s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
            )
        return self._logical_axes

    def abstract_params(self) -> Params:
        """ShapeDtypeStructs of the params (no memory).

        Returns:
          A pytree of ``jax.ShapeDtypeStruct`` matching ``init``'s params.

        Examples:
          >>> import jax
          >>> import jax.numpy as jnp
          >>> from alignjax.models import Model, ModelConfig
          >>> config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
          ...                      num_kv_heads=1, head_dim=8, intermediate_size=32)
          >>> model = Model(config)
          >>> model.abstract_params()["embedding"]
          ShapeDtypeStruct(shape=(32, 16), dtype=float32)
        """
        return jax.eval_shape(lambda r: nn.unbox(self._boxed_init(r)), jax.random.PRNGKey(0))

    def shardings(self, mesh: Mesh | None = None, rules: Any = None) -> Params:
        """Pytree of NamedSharding matching ``params`` (``rules`` default: this model's rules).

        Args:
          mesh: the mesh (default: the model's).
          rules: logical-axis rules (default: the model's).

        Returns:
          A pytree of ``NamedSharding`` matching the params.

        Examples:
          >>> import jax
          >>> import jax.numpy as jnp
          >>> from alignjax.models import Model, ModelConfig
          >>> config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
          ...                      num_kv_heads=1, head_dim=8, intermediate_size=32)
          >>> model = Model(config)
          >>> mesh = jax.make_mesh((1, len(jax.devices()), 1), ("data", "fsdp", "tensor"))
          >>> tuple(model.shardings(mesh)["embedding"].spec)  # vocab over tensor, embed over fsdp
          ('tensor', 'fsdp')
        """
        mesh = mesh if mesh is not None else self.mesh
        if mesh is None:
            raise ValueError("Model.shardings needs a mesh (none given and the model has none)")
        rules = self.rules if rules is None else rules_from_config(rules)
        return tree_shardings(mesh, self.logical_axes, rules)

    def init(self, rng: Array) -> Params:
        """Random params (normal(0.02) kernels, unit norms, zero biases), sharded if a mesh is set.

        Args:
          rng: a PRNG key.

        Returns:
          The params pytree (on the mesh's shardings when the model has a mesh).

        Examples:
          >>> import jax
          >>> import jax.numpy as jnp
          >>> from alignjax.models import Model, ModelConfig
          >>> config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
          ...                      num_kv_heads=1, head_dim=8, intermediate_size=32)
          >>> model = Model(config)
          >>> params = model.init(jax.random.PRNGKey(0))
          >>> sorted(params), sum(x.size for x in jax.tree.leaves(params))
          (['embedding', 'layers_0', 'lm_head', 'norm'], 3376)
        """
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
        ``dropout_rng`` turns on LoRA dropout (the training forward), else it is off.

        Args:
          params: the model's params.
          input_ids: int32 [B, T].
          positions: int32 [B, T]; None = ``arange(T)`` on every row.
          segment_ids: int32 [B, T] packed-sequence ids (0 = padding); None = one segment per row.
          branch_ids: int32 [B, T] for the shared-prompt layout (0 prompt, 1 chosen, 2 rejected); None = none.
          dropout_rng: a key that turns on LoRA dropout (the training forward); None = dropout off.

        Returns:
          The final normed hidden state [B, T, D] in the compute dtype.

        Examples:
          >>> import jax
          >>> import jax.numpy as jnp
          >>> from alignjax.models import Model, ModelConfig
          >>> config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
          ...                      num_kv_heads=1, head_dim=8, intermediate_size=32)
          >>> model = Model(config)
          >>> params = model.init(jax.random.PRNGKey(0))
          >>> jax.jit(model.hidden)(params, jnp.array([[1, 5, 6, 2]])).shape
          (1, 4, 16)
        """
        args = self._defaults(input_ids, positions, segment_ids, branch_ids)
        rngs = None if dropout_rng is None else {"dropout": dropout_rng}
        hidden, _ = self.module.apply({"params": decoder_params(params)}, *args, rngs=rngs)
        return hidden

    def aux_logits(self, params: Params, name: str, features: Array) -> Array:
        """features [..., D] (hidden states, or a sequence's pooled state) -> [..., classes]: the
        logits of aux head ``name`` (fp32)."""
        heads = AuxHeads(((name, dict(self.config.aux_heads)[name]),))
        return heads.apply({"params": params[AUX_HEADS]}, features)[name]

    def unembedding(self, params: Params) -> Array:
        """[D, V]: the lm_head kernel, or the tied embedding transposed.

        Args:
          params: the model's params.

        Returns:
          The [D, V] output projection.

        Examples:
          >>> import jax
          >>> import jax.numpy as jnp
          >>> from alignjax.models import Model, ModelConfig
          >>> config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
          ...                      num_kv_heads=1, head_dim=8, intermediate_size=32)
          >>> model = Model(config)
          >>> params = model.init(jax.random.PRNGKey(0))
          >>> model.unembedding(params).shape
          (16, 32)
        """
        if self.config.tie_word_embeddings:
            return params["embedding"].T
        return params["lm_head"]

    def logits_from_hidden(self, params: Params, hidden: Array) -> Array:
        """hidden [B, T, D] @ unembedding [D, V] -> float32 logits [B, T, V].

        Args:
          params: the model's params.
          hidden: [B, T, D] final hidden states (``hidden``'s output).

        Returns:
          float32 logits [B, T, V].

        Examples:
          >>> import jax
          >>> import jax.numpy as jnp
          >>> from alignjax.models import Model, ModelConfig
          >>> config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
          ...                      num_kv_heads=1, head_dim=8, intermediate_size=32)
          >>> model = Model(config)
          >>> params = model.init(jax.random.PRNGKey(0))
          >>> hidden = jnp.ones((1, 3, 16))
          >>> model.logits_from_hidden(params, hidden).shape
          (1, 3, 32)
        """
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
        :meth:`hidden`.

        Args:
          params: the model's params.
          input_ids: int32 [B, T].
          positions: int32 [B, T]; None = ``arange(T)`` on every row.
          segment_ids: int32 [B, T] packed-sequence ids (0 = padding); None = one segment per row.
          branch_ids: int32 [B, T] for the shared-prompt layout (0 prompt, 1 chosen, 2 rejected); None = none.
          dropout_rng: a key that turns on LoRA dropout (the training forward); None = dropout off.

        Returns:
          float32 logits [B, T, V].

        Examples:
          >>> import jax
          >>> import jax.numpy as jnp
          >>> from alignjax.models import Model, ModelConfig
          >>> config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
          ...                      num_kv_heads=1, head_dim=8, intermediate_size=32)
          >>> model = Model(config)
          >>> params = model.init(jax.random.PRNGKey(0))
          >>> logits = jax.jit(model.apply)(params, jnp.array([[1, 5, 6, 2]]))
          >>> logits.shape
          (1, 4, 32)

          Two sequences packed into one row (segments 1 and 2): each attends only to itself, so its logits
          equal those of the sequence on its own row.

          >>> apply = jax.jit(model.apply)
          >>> packed = jnp.array([[1, 5, 1, 7]])
          >>> out = apply(params, packed, positions=jnp.array([[0, 1, 0, 1]]),
          ...             segment_ids=jnp.array([[1, 1, 2, 2]]))
          >>> alone = apply(params, jnp.array([[1, 7, 0, 0]]), positions=jnp.array([[0, 1, 2, 3]]),
          ...               segment_ids=jnp.array([[1, 1, 0, 0]]))
          >>> bool(jnp.allclose(out[:, 2:], alone[:, :2], atol=1e-5))
          True
        """
        hidden = self.hidden(
            params, input_ids, positions=positions, segment_ids=segment_ids, branch_ids=branch_ids,
            dropout_rng=dropout_rng,
        )
        return self.logits_from_hidden(params, hidden)

    __call__ = apply

    # ---- KV-cache decoding --------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> dict:
        """Zeroed key/value buffers {layers_i: {k, v}} of shape [B, max_length, K, Dh]; with
        ``scan_layers`` one stack {layers: {k, v}} of shape [L, B, max_length, K, Dh].

        Args:
          batch_size: B.
          max_length: the number of cache slots (prompt plus generated tokens).
          dtype: the cache dtype (default: the compute dtype).

        Returns:
          The cache pytree (sharded over the mesh when the model has one).

        Examples:
          >>> import jax
          >>> import jax.numpy as jnp
          >>> from alignjax.models import Model, ModelConfig
          >>> config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
          ...                      num_kv_heads=1, head_dim=8, intermediate_size=32)
          >>> model = Model(config)
          >>> jax.tree.map(jnp.shape, model.init_cache(batch_size=2, max_length=8))
          {'layers_0': {'k': (2, 8, 1, 8), 'v': (2, 8, 1, 8)}}
        """
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
        batch axis of either layout (axis 1 of a scanned cache's [L, B, S, K, Dh]).

        Args:
          cache: a cache from :meth:`init_cache` (or :meth:`decode`).
          repeats: r, the copies of each row (e.g. samples per prompt after one prefill).

        Returns:
          The cache with B r rows.

        Examples:
          >>> import jax
          >>> import jax.numpy as jnp
          >>> from alignjax.models import Model, ModelConfig
          >>> config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
          ...                      num_kv_heads=1, head_dim=8, intermediate_size=32)
          >>> model = Model(config)
          >>> cache = model.repeat_cache_rows(model.init_cache(batch_size=2, max_length=8), 3)
          >>> cache["layers_0"]["k"].shape
          (6, 8, 1, 8)
        """
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

        Args:
          params: the model's params.
          input_ids: int32 [B, t] new tokens.
          cache: the cache from :meth:`init_cache` or the previous call.
          positions: int32 [B, t] their positions (= their cache slots).

        Returns:
          (float32 logits [B, t, V], the updated cache).

        Examples:
          >>> import jax
          >>> import jax.numpy as jnp
          >>> from alignjax.models import Model, ModelConfig
          >>> config = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
          ...                      num_kv_heads=1, head_dim=8, intermediate_size=32)
          >>> model = Model(config)
          >>> params = model.init(jax.random.PRNGKey(0))
          >>> decode = jax.jit(model.decode)
          >>> prompt = jnp.array([[1, 5, 6]])
          >>> cache = model.init_cache(batch_size=1, max_length=8)
          >>> logits, cache = decode(params, prompt, cache, positions=jnp.array([[0, 1, 2]]))
          >>> next_id = jnp.argmax(logits[:, -1:], axis=-1)  # [1, 1]
          >>> step_logits, cache = decode(params, next_id, cache, positions=jnp.array([[3]]))
          >>> full = jax.jit(model.apply)(params, jnp.concatenate([prompt, next_id], axis=1))
          >>> bool(jnp.allclose(step_logits[:, 0], full[:, -1], atol=1e-4))
          True
        """
        chex.assert_rank([input_ids, positions], 2)
        chex.assert_equal_shape([input_ids, positions])
        ones = jnp.ones_like(input_ids)
        hidden, cache = self.module.apply(
            {"params": decoder_params(params)}, input_ids, positions, ones, jnp.zeros_like(input_ids), cache
        )
        return self.logits_from_hidden(params, hidden), cache
