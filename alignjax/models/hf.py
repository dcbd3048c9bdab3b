"""Hugging Face checkpoint import/export (config.json + safetensors, single file or sharded index).

Import places every tensor straight into its target sharding with ``jax.make_array_from_callback``:
each device's callback reads only its slice from the memory-mapped safetensors file, so no host
ever holds the whole model. Layout conversion, per tensor, is "reshape the HF tensor into split
dims, then transpose": e.g. ``q_proj.weight`` [H*Dh, D] -> split (H, Dh, D) -> perm (2, 0, 1) ->
kernel [D, H, Dh]. A device's slice of the target maps back to one contiguous row range per
merged HF dim, which is what ``safe_open(...).get_slice`` reads. A scanned model's stacked leaf
``[L, ...]`` is built the same way, each device's callback stacking its block of every layer's HF
tensor; export takes one layer of it at a time (``model.layers.i.*``), so both layouts read and
write the same HF checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from alignjax import storage
from alignjax.models import lora as lora_lib
from alignjax.models.config import AUX_HEADS, ModelConfig
from alignjax.models.model import Model
from alignjax.models.presets import PRESETS
from alignjax.sharding import gather_to_host


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor <-> one param leaf. ``split``: HF tensor viewed in split dims; ``groups``: which
    split dims merge into each HF dim; ``perm``: target dim t is split dim perm[t]. ``layer``: for a
    scanned model (``ModelConfig.scan_layers``), the index of this HF tensor along the leading
    ``layers`` axis of the stacked leaf at ``param_path`` (``target_shape`` is then one layer's)."""

    param_path: tuple[str, ...]
    hf_name: str
    split: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]
    layer: int | None = None

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
    """The full HF <-> param mapping for ``config``: one map per HF tensor; with ``scan_layers`` the
    maps of layer i point into the stacked ``layers`` leaves at index i."""
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
        p, hf = ("layers" if c.scan_layers else f"layers_{i}"), f"model.layers.{i}"
        attn = (p, "self_attn")
        start = len(maps)
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
        if c.scan_layers:
            maps[start:] = [dataclasses.replace(m, layer=i) for m in maps[start:]]
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


def weight_files(path: str) -> dict[str, str]:
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
    out = {}
    for file in files:
        with open_safetensors(os.path.join(path, file)) as f:
            out.update({name: os.path.join(path, file) for name in f.keys()})
    return out


@contextlib.contextmanager
def open_safetensors(file: str):
    """``safe_open(file)`` whose errors (a truncated or corrupt file) name the file."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(file, framework="numpy")
    except SafetensorError as err:
        raise ValueError(f"{file}: not a complete safetensors file ({err})") from None
    with handle as f:
        yield f


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def load_params(model: Model, path: str, *, missing_ok: Sequence[str] = ()) -> dict:
    """Reads the checkpoint in ``path`` into ``model``'s param pytree, each leaf placed with its
    sharding (``model.mesh``; one device when there is none). Tensors named in ``missing_ok`` that
    the checkpoint lacks are zeros (a sequence classifier has no ``lm_head.weight``). A scanned
    model's stacked leaves are built per device from the per-layer HF tensors
    (:func:`_stacked_array`), so no host holds more of a stack than its own devices' slices."""
    files = weight_files(path)
    dtype = np.dtype(jnp.dtype(model.config.param_dtype))
    shardings = model.shardings() if model.mesh is not None else None
    params: dict = {}
    stacked: dict[tuple[str, ...], list[tuple[TensorMap, Any]]] = {}  # per layer (map, HF slice)
    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}
        for m in tensor_maps(model.config):
            file = files.get(m.hf_name)
            if file is None and m.hf_name in missing_ok and m.layer is not None:
                stacked.setdefault(m.param_path, []).append((m, None))
                continue
            if file is None and m.hf_name in missing_ok:
                sharding = _get(shardings, m.param_path) if shardings is not None else None
                _set(params, m.param_path, jnp.zeros(m.target_shape, dtype, device=sharding))
                continue
            if file is None:
                raise ValueError(
                    f"{path}: tensor {m.hf_name!r} (for param {'/'.join(m.param_path)}) is missing from the "
                    f"checkpoint files {sorted(set(os.path.basename(f) for f in files.values()))}"
                )
            if file not in handles:
                handles[file] = stack.enter_context(open_safetensors(file))
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
            if m.layer is not None:
                stacked.setdefault(m.param_path, []).append((m, tensor))
                continue
            sharding = (
                _get(shardings, m.param_path)
                if shardings is not None
                else SingleDeviceSharding(jax.local_devices()[0])
            )
            read = _once_per_index(lambda index, m=m, t=tensor: _read_block(t, m, index).astype(dtype))
            read_rows = _once_per_index(
                lambda index, m=m, t=tensor: _read_block(t, _hf_view(m), index).astype(dtype)
            )
            _set(params, m.param_path, _placed(m, None, sharding, read, read_rows))
        for param_path, layers in stacked.items():
            sharding = (
                _get(shardings, param_path)
                if shardings is not None
                else SingleDeviceSharding(jax.local_devices()[0])
            )
            _set(params, param_path, _stacked_array(layers, sharding, dtype))
    return params


def _stacked_array(layers: Sequence[tuple[TensorMap, Any]], sharding: Any, dtype: np.dtype) -> jax.Array:
    """The ``[L, ...]`` leaf of a scanned model from its per-layer HF tensors (``layers[i]`` =
    ``(map, safetensors slice or None for zeros)``, in layer order): each device's callback reads,
    for the layers in its slice, only its block of each layer, and stacks them."""
    m = layers[0][0]

    def stack(index: Sequence[slice], view: Callable[[TensorMap], TensorMap], shape: tuple) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (1 + len(shape) - len(index))
        first, last, _ = index[0].indices(len(layers))
        blocks = [
            _read_block(tensor, view(m), index[1:]).astype(dtype)
            if tensor is not None
            else np.zeros(shape, dtype)[index[1:]]
            for m, tensor in layers[first:last]
        ]
        return np.stack(blocks)

    read = _once_per_index(lambda index: stack(index, lambda m: m, m.target_shape))
    read_rows = _once_per_index(lambda index: stack(index, _hf_view, m.hf_shape))
    return _placed(m, len(layers), sharding, read, read_rows)


def _once_per_index(read: Callable[[Any], np.ndarray]) -> Callable[[Any], np.ndarray]:
    """``read`` for ``make_array_from_callback``, run once per distinct index: replicated shards
    are read once per host."""
    cache: dict[Any, np.ndarray] = {}

    def once(index: Sequence[slice]) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            cache[key] = read(index)
        return cache[key]

    return once


def _hf_view(m: TensorMap) -> TensorMap:
    """``m``'s tensor in its own HF layout (no split, no transpose)."""
    n = len(m.hf_shape)
    return TensorMap(m.param_path, m.hf_name, m.hf_shape, tuple((i,) for i in range(n)), tuple(range(n)))


def _placed(
    m: TensorMap,
    num_layers: int | None,
    sharding: Any,
    read: Callable[[Any], np.ndarray],
    read_rows: Callable[[Any], np.ndarray],
) -> jax.Array:
    """The leaf of ``m`` (stacked over ``num_layers`` for a scanned model) in ``sharding``: built
    by ``read`` (a block of the target), or, where :func:`_row_sharding` finds that splitting the
    HF rows across processes reads less on the busiest host, built in HF layout by ``read_rows`` (a
    block of HF rows, one contiguous byte range of the file) and converted and resharded on
    device. fsdp splits most kernels along HF's inner dim, so a target block spans every HF row:
    without this each host would touch every page of the checkpoint."""
    lead = () if num_layers is None else (num_layers,)
    row = _row_sharding(sharding, m, lead)
    if row is None:
        return jax.make_array_from_callback(lead + m.target_shape, sharding, read)
    rows = jax.make_array_from_callback(lead + m.hf_shape, row, read_rows)
    # Waited for: on CPU, collectives of programs left in flight together can deadlock (gloo).
    return jax.block_until_ready(_hf_to_target(m.split, m.perm, len(lead), sharding)(rows))


@functools.cache
def _hf_to_target(
    split: tuple[int, ...], perm: tuple[int, ...], lead: int, sharding: Any
) -> Callable[[jax.Array], jax.Array]:
    """Jitted HF layout -> target layout (``TensorMap.to_target`` behind ``lead`` layer dims), out in
    ``sharding``; one per layout and sharding, so the layers of a model share its compile."""
    axes = tuple(range(lead)) + tuple(lead + p for p in perm)
    return jax.jit(lambda a: a.reshape(a.shape[:lead] + split).transpose(axes), out_shardings=sharding)


def _row_sharding(sharding: Any, m: TensorMap, lead: tuple[int, ...]) -> Any:
    """A sharding of the HF-layout array ``lead + m.hf_shape`` over ``sharding``'s mesh that splits
    the HF rows (then the layers) over as many mesh axes as divide them, or None where that would
    not read fewer rows on the busiest process than ``sharding`` does (always on one process).
    Decided from the global device map, so every process decides the same."""
    from jax.sharding import NamedSharding, PartitionSpec

    if jax.process_count() == 1 or not isinstance(sharding, NamedSharding):
        return None
    mesh = sharding.mesh
    shape = lead + m.hf_shape
    row_dims = [len(lead)] + list(range(len(lead)))
    axes_of = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
    order = [a for e in sharding.spec for a in axes_of(e)] + list(mesh.axis_names)
    spec: list[list[str]] = [[] for _ in shape]
    for axis in dict.fromkeys(order):
        for d in row_dims:
            n = math.prod(mesh.shape[a] for a in spec[d]) * mesh.shape[axis]
            if mesh.shape[axis] > 1 and shape[d] % n == 0:
                spec[d].append(axis)
                break
    row = NamedSharding(mesh, PartitionSpec(*(tuple(a) or None for a in spec)))
    R, k = m.hf_shape[0], len(lead)
    g0 = m.groups[0]
    inner = math.prod(m.split[g] for g in g0[1:])
    t0 = k + m.perm.index(g0[0])

    def target_rows(index: tuple[slice, ...]) -> tuple[range, range]:
        a0, a1, _ = index[t0].indices(m.split[g0[0]])
        return _layer_range(index, lead), range(a0 * inner, a1 * inner)

    def hf_rows(index: tuple[slice, ...]) -> tuple[range, range]:
        return _layer_range(index, lead), range(*index[k].indices(R)[:2])

    busiest = _busiest_rows(row, shape, hf_rows, R)
    if busiest >= _busiest_rows(sharding, lead + m.target_shape, target_rows, R):
        return None
    return row


def _layer_range(index: tuple[slice, ...], lead: tuple[int, ...]) -> range:
    return range(*index[0].indices(lead[0])[:2]) if lead else range(1)


def _busiest_rows(
    sharding: Any, shape: tuple[int, ...], rows_of: Callable[[Any], tuple[range, range]], num_rows: int
) -> int:
    """The most (layer, HF row) pairs any one process's devices read under ``sharding``."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        layers, rows = rows_of(tuple(index))
        spans.setdefault(device.process_index, []).extend(
            (layer * num_rows + rows.start, layer * num_rows + rows.stop) for layer in layers
        )
    return max(_union_length(s) for s in spans.values())


def _union_length(spans: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for start, stop in sorted(spans):
        total += max(0, stop - max(start, end))
        end = max(end, stop)
    return total


def from_pretrained(
    path_or_preset: str,
    *,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    rules: Any = None,
    compute_dtype: str | None = None,
    remat: str | None = None,
    attention_kernel: str | None = None,
    scan_layers: bool | None = None,
    lora: Any = None,
    aux_heads: tuple = (),
) -> Model:
    """A ``Model`` with ``.params`` loaded from an HF checkpoint directory, or a preset with random
    params (seed 0). ``dtype`` is the param dtype (and compute dtype unless ``compute_dtype``);
    ``remat``, ``attention_kernel`` and ``scan_layers`` set those ``ModelConfig`` fields (None: the
    preset's value, or ``ModelConfig``'s default for a checkpoint directory). ``lora`` (a
    ``LoraConfig``) adds adapters (key 0; ``alignjax.models.lora.attach``) to the loaded weights;
    ``aux_heads`` (``ModelConfig.aux_heads``) fresh classifiers beside them (key 1)."""
    overrides: dict[str, Any] = {"param_dtype": dtype, "dtype": compute_dtype or dtype}
    if lora is not None:
        overrides["lora"] = lora
    if aux_heads:
        overrides["aux_heads"] = tuple(aux_heads)
    if remat is not None:
        overrides["remat"] = remat
    if attention_kernel is not None:
        overrides["attention_kernel"] = attention_kernel
    if scan_layers is not None:
        overrides["scan_layers"] = bool(scan_layers)
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
    decoder = Model(config.replace(aux_heads=()), mesh=mesh, rules=rules)
    if config.lora is None:
        model.params = load_params(decoder, path)
    else:
        base = load_params(Model(config.replace(lora=None, aux_heads=()), mesh=mesh, rules=rules), path)
        model.params = lora_lib.attach(decoder, base, jax.random.PRNGKey(0))
    if config.aux_heads:  # fresh classifiers beside the loaded decoder
        heads = model.init_aux_heads(jax.random.PRNGKey(1))
        if mesh is not None:
            heads = jax.device_put(heads, model.shardings()[AUX_HEADS])
        model.params = {**model.params, AUX_HEADS: heads}
    return model


# ------------------------------------------------------------------------------------------ export

# safetensors dtype codes (the format's header strings).
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclasses.dataclass(frozen=True)
class ExportTensor:
    """One tensor of an HF checkpoint, not yet on the host: ``fetch()`` gathers it (every process
    must call it, in the same order: on several processes it is a collective) and returns it in HF
    layout and the export dtype."""

    name: str
    shape: tuple[int, ...]
    fetch: Callable[[], np.ndarray]


def parse_size(size: int | str) -> int:
    """``5GB`` -> 5 * 10**9 bytes, ``2GiB`` -> 2 * 2**30, ``500MB``, ``10KB``, or a plain integer
    (transformers' ``max_shard_size`` convention: decimal units, ``i`` for binary ones)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if match:
        factor = _SIZE_UNITS[match.group(2) or "B"]
        return int(float(match.group(1)) * factor)
    raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '5GB', '500MB', '2GiB'")


@jax.jit
def _layer_of(stacked: jax.Array, layer: jax.Array) -> jax.Array:
    """``stacked[layer]`` on device (traced index: one program per shape, not per layer)."""
    return jax.lax.dynamic_index_in_dim(stacked, layer, axis=0, keepdims=False)


def _leaf(params: Any, m: TensorMap) -> Any:
    """The param ``m`` reads: a leaf, or for a scanned model one layer's slice of a stacked leaf."""
    leaf = _get(params, m.param_path)
    if m.layer is None:
        return leaf
    if isinstance(leaf, jax.Array):
        return _layer_of(leaf, jnp.int32(m.layer))
    return np.asarray(leaf)[m.layer]


def decoder_tensors(
    config: ModelConfig, params: Any, dtype: str, *, lm_head: bool = True
) -> list[ExportTensor]:
    """The decoder's HF tensors in checkpoint order, plus the zero biases HF requires but ``config``
    lacks (HF's ``attention_bias`` covers q/k/v/o together; Qwen2 always has q/k/v biases).
    ``lm_head=False`` leaves out ``lm_head.weight`` (a sequence classifier has ``score`` instead).
    LoRA params are merged first (``W + s A B``, quantized kernels dequantized; on device, one copy
    of the decoder, ``alignjax.models.lora.merge``): the plain HF model of the adapted policy."""
    if config.lora is not None:
        params, config = lora_lib.merge(config, params), config.replace(lora=None)
    np_dtype = np.dtype(jnp.dtype(dtype))
    out = [
        ExportTensor(m.hf_name, m.hf_shape, lambda m=m: m.to_hf(gather_to_host(_leaf(params, m), np_dtype)))
        for m in tensor_maps(config)
        if lm_head or m.hf_name != "lm_head.weight"
    ]
    have = {t.name for t in out}
    if config.to_hf().get("attention_bias") or config.model_type == "qwen2":
        D, H, K, Dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        for i in range(config.num_layers):
            pre = f"model.layers.{i}.self_attn"
            need = {f"{pre}.q_proj.bias": H * Dh, f"{pre}.k_proj.bias": K * Dh, f"{pre}.v_proj.bias": K * Dh}
            if config.model_type != "qwen2":
                need[f"{pre}.o_proj.bias"] = D
            out += [
                ExportTensor(name, (size,), lambda size=size: np.zeros((size,), np_dtype))
                for name, size in need.items()
                if name not in have
            ]
    return out


def plan_shards(tensors: Sequence[ExportTensor], itemsize: int, max_bytes: int) -> list[list[ExportTensor]]:
    """Consecutive tensors grouped into shards of at most ``max_bytes`` (a larger tensor gets a shard
    of its own), as transformers' ``save_pretrained`` shards."""
    shards: list[list[ExportTensor]] = [[]]
    size = 0
    for t in tensors:
        n = math.prod(t.shape) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _safetensors_header(tensors: Sequence[ExportTensor], dtype: str) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding ``tensors`` in this order."""
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        n = math.prod(t.shape) * itemsize
        header[t.name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text


def write_safetensors(
    tensors: Sequence[ExportTensor],
    path: Any,
    *,
    dtype: str,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
    """Streams ``tensors`` into ``path`` as ``model.safetensors``, or, past ``max_shard_size``, as
    ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``. Returns the file names.

    The shard plan comes from the shapes, so each file's header is written first and every tensor is
    gathered, written and dropped in turn: a host holds one tensor at a time, never a shard or the
    model. Every process gathers; process 0 writes (``path`` may be ``gs://``).
    """
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"export dtype {dtype!r}; use one of {sorted(_SAFETENSORS_DTYPES)}")
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    shards = plan_shards(tensors, itemsize, parse_size(max_shard_size))
    n = len(shards)
    names = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    writer = jax.process_index() == 0
    out = storage.path(path)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    for name, shard in zip(names, shards, strict=True):
        with _atomic_open(out / name) if writer else contextlib.nullcontext() as f:
            if writer:
                f.write(_safetensors_header(shard, dtype))
            for t in shard:
                array = t.fetch()
                if array.shape != t.shape:  # a bug in the tensor map, never the user's input
                    raise AssertionError(f"{t.name}: gathered {array.shape}, planned {t.shape}")
                if writer:
                    f.write(np.ascontiguousarray(array).tobytes())
                del array
    if writer and n > 1:
        total = sum(math.prod(t.shape) * itemsize for t in tensors)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {t.name: name for name, shard in zip(names, shards, strict=True) for t in shard},
        }
        storage.write_text(
            out / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
    return names


@contextlib.contextmanager
def _atomic_open(target: Any):
    """A binary file that appears complete or not at all: locally a temporary file renamed on close;
    on an object store the upload itself (committed on close)."""
    if not storage.is_local(target):
        with target.open("wb") as f:
            yield f
        return
    tmp = target.parent / f".{target.name}.tmp"
    with open(tmp, "wb") as f:
        yield f
    os.replace(tmp, target)


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """``bos_token_id``/``eos_token_id``/``pad_token_id`` of an alignjax ``ChatTokenizer`` (pad: the
    tokenizer's pad token, else EOS, as alignjax pads)."""
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }


def save_tokenizer(tokenizer: Any, path: Any) -> None:
    """``tokenizer.save_pretrained`` (an alignjax ``ChatTokenizer``: tokenizer.json, tokenizer_config.json,
    chat templates, as transformers 5.x writes them) into ``path``, which may be ``gs://``."""
    import tempfile

    out = storage.path(path)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), tmp)
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                with open(os.path.join(root, name), "rb") as f:
                    storage.write_bytes(out / rel, f.read())


def save_pretrained(
    model: Model,
    params: Any,
    path: Any,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    tokenizer: Any = None,
    lm_head: bool = True,
    extra_tensors: Sequence[ExportTensor] = (),
    config_updates: Mapping[str, Any] | None = None,
) -> None:
    """Writes ``model`` with ``params`` to ``path`` (local or ``gs://``) as a Hugging Face checkpoint:
    ``config.json``, safetensors (:func:`write_safetensors`: one tensor on a host at a time, sharded
    past ``max_shard_size``), and with ``tokenizer`` (an alignjax ``ChatTokenizer``) its files, its
    bos/eos/pad ids in ``config.json`` and a ``generation_config.json``.

    ``dtype``: of the written tensors, default the param dtype. ``lm_head=False``, ``extra_tensors``
    and ``config_updates`` are the sequence-classifier export's (``alignjax.reward.export``).
    Every process calls this (the gathers are collective); process 0 writes.
    """
    config = model.config
    dtype = dtype or config.param_dtype
    tensors = decoder_tensors(config, params, dtype, lm_head=lm_head) + list(extra_tensors)
    write_safetensors(tensors, path, dtype=dtype, max_shard_size=max_shard_size)
    if jax.process_index() != 0:
        return
    out = storage.path(path)
    hf_config = config.to_hf()
    hf_config.update(dtype=dtype, torch_dtype=dtype)
    if tokenizer is not None:
        ids = special_token_ids(tokenizer)
        hf_config.update(ids)
        generation = {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}
        storage.write_text(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        save_tokenizer(tokenizer, out)
    hf_config.update(config_updates or {})
    storage.write_text(out / "config.json", json.dumps(hf_config, indent=2) + "\n")
