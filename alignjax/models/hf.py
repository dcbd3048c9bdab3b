"""Hugging Face checkpoint import/export (config.json + safetensors, single file or sharded index).

Import places every tensor straight into its target sharding with ``jax.make_array_from_callback``:
each device's callback reads only its slice from the memory-mapped safetensors file, so no host
ever holds the whole model. Layout conversion, per tensor, is "reshape the HF tensor into split
dims, then transpose": e.g. ``q_proj.weight`` [H*Dh, D] -> split (H, Dh, D) -> perm (2, 0, 1) ->
kernel [D, H, Dh]. A device's slice of the target maps back to one contiguous row range per
merged HF dim, which is what ``safe_open(...).get_slice`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from alignjax.models.config import ModelConfig
from alignjax.models.model import Model
from alignjax.models.presets import PRESETS


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor <-> one param leaf. ``split``: HF tensor viewed in split dims; ``groups``: which
    split dims merge into each HF dim; ``perm``: target dim t is split dim perm[t]."""

    param_path: tuple[str, ...]
    hf_name: str
    split: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(self.split[g] for g in group) for group in self.groups)

    @property
    def target_shape(self) -> tuple[int, ...]:
        return tuple(self.split[p] for p in self.perm)

    def to_target(self, hf_array: np.ndarray) -> np.ndarray:
        return hf_array.reshape(self.split).transpose(self.perm)

    def to_hf(self, target: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(target.transpose(np.argsort(self.perm))).reshape(self.hf_shape)


def tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """The full HF <-> param mapping for ``config``."""
    c = config
    D, H, K, Dh, F, V = (
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
    )
    ident = lambda path, name, shape: TensorMap(
        path, name, shape, tuple((i,) for i in range(len(shape))), tuple(range(len(shape)))
    )
    linear = lambda path, name, n_out, n_in: TensorMap(path, name, (n_out, n_in), ((0,), (1,)), (1, 0))
    maps = [ident(("embedding",), "model.embed_tokens.weight", (V, D))]
    for i in range(c.num_layers):
        p, hf = f"layers_{i}", f"model.layers.{i}"
        attn = (p, "self_attn")
        for proj, n in (("q_proj", H), ("k_proj", K), ("v_proj", K)):
            maps.append(
                TensorMap(
                    attn + (proj, "kernel"),
                    f"{hf}.self_attn.{proj}.weight",
                    (n, Dh, D),
                    ((0, 1), (2,)),
                    (2, 0, 1),
                )
            )
            if c.attention_bias:
                maps.append(
                    TensorMap(
                        attn + (proj, "bias"), f"{hf}.self_attn.{proj}.bias", (n, Dh), ((0, 1),), (0, 1)
                    )
                )
        maps.append(
            TensorMap(
                attn + ("o_proj", "kernel"),
                f"{hf}.self_attn.o_proj.weight",
                (D, H, Dh),
                ((0,), (1, 2)),
                (1, 2, 0),
            )
        )
        if c.attention_out_bias:
            maps.append(ident(attn + ("o_proj", "bias"), f"{hf}.self_attn.o_proj.bias", (D,)))
        if c.qk_norm:
            maps.append(ident(attn + ("q_norm", "scale"), f"{hf}.self_attn.q_norm.weight", (Dh,)))
            maps.append(ident(attn + ("k_norm", "scale"), f"{hf}.self_attn.k_norm.weight", (Dh,)))
        maps.append(linear((p, "mlp", "gate_proj", "kernel"), f"{hf}.mlp.gate_proj.weight", F, D))
        maps.append(linear((p, "mlp", "up_proj", "kernel"), f"{hf}.mlp.up_proj.weight", F, D))
        maps.append(linear((p, "mlp", "down_proj", "kernel"), f"{hf}.mlp.down_proj.weight", D, F))
        maps.append(ident((p, "input_layernorm", "scale"), f"{hf}.input_layernorm.weight", (D,)))
        maps.append(
            ident((p, "post_attention_layernorm", "scale"), f"{hf}.post_attention_layernorm.weight", (D,))
        )
    maps.append(ident(("norm", "scale"), "model.norm.weight", (D,)))
    if not c.tie_word_embeddings:
        maps.append(linear(("lm_head",), "lm_head.weight", V, D))
    return maps


def _read_block(tensor_slice: Any, m: TensorMap, index: Sequence[slice]) -> np.ndarray:
    """Reads the part of HF tensor ``m`` that lands in target slice ``index`` (one device's shard)."""
    split_rng: list[tuple[int, int]] = [(0, 0)] * len(m.split)
    for t, s in enumerate(tuple(index) + (slice(None),) * (len(m.perm) - len(index))):
        start, stop, _ = s.indices(m.split[m.perm[t]])
        split_rng[m.perm[t]] = (start, stop)
    src, block_shape, post = [], [], []
    for group in m.groups:
        inner = math.prod(m.split[g] for g in group[1:])
        a0, a1 = split_rng[group[0]]
        src.append(slice(a0 * inner, a1 * inner))
        block_shape += [a1 - a0] + [m.split[g] for g in group[1:]]
        post += [slice(None)] + [slice(*split_rng[g]) for g in group[1:]]
    block = np.asarray(tensor_slice[tuple(src)]).reshape(block_shape)[tuple(post)]
    return block.transpose(m.perm)


def _weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file path (sharded index, single file, or all *.safetensors)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors"
        )
    from safetensors import safe_open

    out = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="numpy") as f:
            out.update({name: os.path.join(path, file) for name in f.keys()})
    return out


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def load_params(model: Model, path: str) -> dict:
    """Reads the checkpoint in ``path`` into ``model``'s param pytree, each leaf placed with its
    sharding (``model.mesh``; one device when there is none)."""
    from safetensors import safe_open

    files = _weight_files(path)
    dtype = np.dtype(jnp.dtype(model.config.param_dtype))
    shardings = model.shardings() if model.mesh is not None else None
    params: dict = {}
    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}
        for m in tensor_maps(model.config):
            file = files.get(m.hf_name)
            if file is None:
                raise ValueError(
                    f"{path}: tensor {m.hf_name!r} (for param {'/'.join(m.param_path)}) is missing from the "
                    f"checkpoint files {sorted(set(os.path.basename(f) for f in files.values()))}"
                )
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
            try:
                tensor = handles[file].get_slice(m.hf_name)
            except Exception as e:  # an index that names a file without the tensor
                raise ValueError(
                    f"{file}: tensor {m.hf_name!r} listed in the index is not in the file"
                ) from e
            found = tuple(tensor.get_shape())
            if found != m.hf_shape:
                raise ValueError(
                    f"{file}: tensor {m.hf_name!r} has shape {found}, expected {m.hf_shape} for "
                    f"config.json (model_type={model.config.model_type!r})"
                )
            sharding = (
                _get(shardings, m.param_path)
                if shardings is not None
                else SingleDeviceSharding(jax.local_devices()[0])
            )
            cache: dict[Any, np.ndarray] = {}

            def read(index, m=m, tensor=tensor, cache=cache):
                key = tuple((s.start, s.stop) for s in index)
                if key not in cache:  # replicated shards read once per host
                    cache[key] = _read_block(tensor, m, index).astype(dtype)
                return cache[key]

            _set(params, m.param_path, jax.make_array_from_callback(m.target_shape, sharding, read))
    return params


def from_pretrained(
    path_or_preset: str,
    *,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    rules: Any = None,
    compute_dtype: str | None = None,
    remat: str | None = None,
    attention_kernel: str | None = None,
) -> Model:
    """A ``Model`` with ``.params`` loaded from an HF checkpoint directory, or a preset with random
    params (seed 0). ``dtype`` is the param dtype (and compute dtype unless ``compute_dtype``);
    ``remat`` and ``attention_kernel`` set those ``ModelConfig`` fields."""
    overrides: dict[str, Any] = {"param_dtype": dtype, "dtype": compute_dtype or dtype}
    if remat is not None:
        overrides["remat"] = remat
    if attention_kernel is not None:
        overrides["attention_kernel"] = attention_kernel
    if path_or_preset in PRESETS:
        model = Model(PRESETS[path_or_preset].replace(**overrides), mesh=mesh, rules=rules)
        model.params = model.init(jax.random.PRNGKey(0))
        return model
    path = os.fspath(path_or_preset)
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.exists(config_file):
        raise FileNotFoundError(
            f"{path_or_preset!r} is neither a preset ({sorted(PRESETS)}) nor a directory with config.json"
        )
    with open(config_file) as f:
        hf = json.load(f)
    config = ModelConfig.from_hf(hf, source=config_file, **overrides)
    model = Model(config, mesh=mesh, rules=rules)
    model.params = load_params(model, path)
    return model


def _to_host(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_pretrained(model: Model, params: Any, path: str) -> None:
    """Writes ``config.json`` and ``model.safetensors`` in HF layout (param dtype) to ``path``.

    Gathers one tensor at a time to host; process 0 writes. Biases HF requires but this config
    lacks (HF's ``attention_bias`` covers q/k/v/o together) are written as zeros.
    """
    from safetensors.numpy import save_file

    config = model.config
    dtype = np.dtype(jnp.dtype(config.param_dtype))
    tensors: dict[str, np.ndarray] = {}
    for m in tensor_maps(config):
        tensors[m.hf_name] = m.to_hf(_to_host(_get(params, m.param_path)).astype(dtype))
    hf_config = config.to_hf()
    if hf_config.get("attention_bias") or config.model_type == "qwen2":
        D, H, K, Dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        for i in range(config.num_layers):
            pre = f"model.layers.{i}.self_attn"
            need = {f"{pre}.q_proj.bias": H * Dh, f"{pre}.k_proj.bias": K * Dh, f"{pre}.v_proj.bias": K * Dh}
            if config.model_type != "qwen2":
                need[f"{pre}.o_proj.bias"] = D
            for name, size in need.items():
                tensors.setdefault(name, np.zeros((size,), dtype))
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))  # never a half-written checkpoint
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
