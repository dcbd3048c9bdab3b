"""LoRA and QLoRA on the decoder: adapters inside ``Proj``, the frozen/trainable split, merging.

LoRA ("LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., arXiv:2106.09685): a targeted
projection computes ``y = x W (+ b) + s (x A) B`` with ``A`` [*in, r] (PEFT's init: uniform in
``+-1/sqrt(fan_in)``), ``B`` [r, *out] zero-initialised and ``s = alpha / r``; only ``A``, ``B`` (and
a reward model's head) are trained. The adapters are params ``lora_a`` / ``lora_b`` next to the
projection's ``kernel`` and carry logical axes (the kernel's input axes + ``lora_rank``;
``lora_rank`` + its output axes), so they shard on the mesh, stack under ``nn.scan`` and are
rematerialised with their layer like every other param; they are stored in fp32 and applied in the
compute dtype.

The reference for free: a ``Proj`` whose params hold no ``lora_a`` runs the base weights alone, so
DPO's reference is the same params with the adapters removed (:func:`strip_adapters`) -- the same
forward program, no copy of the weights. With ``B = 0`` the adapter adds exact zeros: the policy's
log-probs equal the base model's bitwise.

QLoRA ("QLoRA: Efficient Finetuning of Quantized LLMs", Dettmers et al., arXiv:2305.14314): with
``LoraConfig.quantize`` the targeted kernels are stored quantized in blocks of :data:`BLOCK`
(:func:`block_size`) consecutive weights along the flattened input dimension, each block scaled by its absmax:
``int8`` codes ``round(127 w / absmax)``, or ``nf4`` (4-bit NormalFloat, :data:`NF4` levels, two codes
a byte), dequantized to the compute dtype where used; the adapters stay in the param dtype.

Why not qwix: it intercepts a module's matmuls and adds its own params, outside our logical-axis
names and HF/PEFT name maps; adapters inside ``Proj`` get sharding, scan stacking and export from
the code that already handles the kernels, in a hundred lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alignjax import storage
from alignjax.models.config import AUX_HEADS, LORA_ALL_LINEAR, LoraConfig, ModelConfig
from alignjax.models.transformer import dense
from alignjax.sharding import gather_to_host

Array = jax.Array
ADAPTERS = ("lora_a", "lora_b")
BLOCK = 64  # quantization block (QLoRA's block size for NF4)
# QLoRA's NF4 code book (bitsandbytes' table): the quantiles of N(0, 1) rescaled to [-1, 1].
NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip


def from_config(lora: Any) -> LoraConfig | None:
    """``config.model.lora`` -> a :class:`LoraConfig`, or None when ``rank`` is 0 (no adapters).

    ``targets``: a comma-separated string or a sequence of patterns; ``all-linear`` (PEFT's name) is
    every projection of the attention and MLP blocks.
    """
    if lora is None or not int(lora.get("rank", 0) or 0):
        return None
    targets = lora.get("targets", "all-linear")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = tuple(t for name in targets for t in (LORA_ALL_LINEAR if name == "all-linear" else (name,)))
    if not any(fnmatch_any(t) for t in targets):
        raise ValueError(
            f"config.model.lora.targets={lora.get('targets')!r} matches no projection; names: "
            f"{list(LORA_ALL_LINEAR)} (fnmatch patterns, or 'all-linear')"
        )
    return LoraConfig(
        rank=int(lora.rank),
        alpha=float(lora.get("alpha", 16.0)),
        dropout=float(lora.get("dropout", 0.0) or 0.0),
        targets=targets,
        quantize=str(lora.get("quantize", "none") or "none"),
    )


def fnmatch_any(pattern: str) -> bool:
    probe = LoraConfig(rank=1, targets=(pattern,))
    return any(probe.applies(n, p) for n in LORA_ALL_LINEAR for p in ("self_attn", "mlp"))


def target(config: ModelConfig, name: str, parent: str) -> LoraConfig | None:
    """The adapter config of projection ``parent/name``, or None where it gets none."""
    lora = config.lora
    return lora if lora is not None and lora.applies(name, parent) else None


def model_lora(model: Any) -> LoraConfig | None:
    """The LoRA config of a ``Model`` or a ``RewardModel`` (its decoder's), or None."""
    config = model.config
    config = getattr(config, "decoder", config)
    return getattr(config, "lora", None)


# ---------------------------------------------------------------------------------- in the module


def adapter(module: nn.Module, x: Array, in_shape: tuple, out_shape: tuple, axes: tuple) -> Array:
    """``s (x A) B`` for a ``Proj`` (``x`` already in the compute dtype); creates ``lora_a`` and
    ``lora_b`` at init."""
    lora = module.lora
    n_in = len(in_shape)
    bound = 1.0 / math.sqrt(math.prod(in_shape))  # kaiming_uniform(a=sqrt(5)), PEFT's default for A
    a_init = lambda rng, shape, dtype: jax.random.uniform(rng, shape, dtype, -bound, bound)  # noqa: E731
    # Adapters are stored in fp32 whatever the base's dtype (PEFT's autocast_adapter_dtype): they
    # are the only weights Adam updates, and bf16 would round small steps away.
    dtype = jnp.promote_types(module.param_dtype, jnp.float32)
    a = module.param(
        "lora_a",
        nn.with_logical_partitioning(a_init, (*axes[:n_in], "lora_rank")),
        (*in_shape, lora.rank),
        dtype,
    )
    b = module.param(
        "lora_b",
        nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", *axes[n_in:])),
        (lora.rank, *out_shape),
        dtype,
    )
    if lora.dropout and module.has_rng("dropout"):  # PEFT's lora_dropout: on the adapter's input,
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)  # training only
        x = jnp.where(keep, x / jnp.asarray(1.0 - lora.dropout, x.dtype), jnp.zeros_like(x))
    h = dense(x, a.astype(x.dtype), n_in)
    return dense(h, b.astype(x.dtype), 1) * jnp.asarray(lora.scale, x.dtype)


def quantized_shapes(shape: tuple, n_in: int, kind: str) -> tuple[tuple, tuple]:
    """(codes shape, scales shape) of a kernel ``shape`` with ``n_in`` input dims."""
    size, out = math.prod(shape[:n_in]), tuple(shape[n_in:])
    if kind == "nf4" and size % 2:
        raise ValueError(f"config.model.lora.quantize='nf4': a kernel's input size {size} is odd")
    return ((size // 2 if kind == "nf4" else size, *out), (size // block_size(size), *out))


def block_size(size: int) -> int:
    """Weights per quantization block: :data:`BLOCK`, or the largest power of two dividing a
    smaller input size."""
    return math.gcd(size, BLOCK)


def quantize(w: Array, n_lead: int, n_in: int, kind: str) -> tuple[Array, Array]:
    """``w`` [*lead, *in, *out] -> (codes [*lead, I or I/2, *out], fp32 scales [*lead, I/block, *out])
    with ``I = prod(in)``: absmax per block of :func:`block_size` weights along the flattened input."""
    lead, ins, outs = w.shape[:n_lead], w.shape[n_lead : n_lead + n_in], w.shape[n_lead + n_in :]
    size = math.prod(ins)
    block = block_size(size)
    blocks = w.astype(jnp.float32).reshape(*lead, size // block, block, *outs)
    absmax = jnp.max(jnp.abs(blocks), axis=n_lead + 1, keepdims=True)
    absmax = jnp.where(absmax == 0, 1.0, absmax)
    x = blocks / absmax
    if kind == "int8":
        codes = jnp.round(x * 127.0).astype(jnp.int8).reshape(*lead, size, *outs)
        return codes, jnp.squeeze(absmax / 127.0, n_lead + 1)
    mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    idx = jnp.searchsorted(mids, x).astype(jnp.uint8).reshape(*lead, size // 2, 2, *outs)
    hi, lo = jnp.take(idx, 0, axis=n_lead + 1), jnp.take(idx, 1, axis=n_lead + 1)
    return (hi << 4) | lo, jnp.squeeze(absmax, n_lead + 1)


def dequantize(codes: Array, scales: Array, shape: tuple, n_in: int, kind: str, dtype: Any) -> Array:
    """The inverse of :func:`quantize` for one kernel (no leading dims), in ``dtype``."""
    outs = tuple(shape[n_in:])
    size = math.prod(shape[:n_in])
    if kind == "int8":
        values = codes.astype(jnp.float32)
    else:
        pair = jnp.stack([codes >> 4, codes & 15], axis=1)  # [I/2, 2, *out]
        values = jnp.asarray(NF4)[pair.astype(jnp.int32)].reshape(size, *outs)
    values = values.reshape(scales.shape[0], -1, *outs) * scales[:, None].astype(jnp.float32)
    return values.reshape(shape).astype(dtype)


def quantized_kernel(
    module: nn.Module, shape: tuple, axes: tuple, kind: str, param_dtype: Any, dtype: Any
) -> Array:
    """A ``Proj``'s kernel stored as ``kernel`` (codes) + ``kernel_scale``; at init a normal(0.02)
    kernel, quantized. Returns the dequantized kernel in ``dtype``."""
    n_in = len(module.in_shape)
    code_shape, scale_shape = quantized_shapes(shape, n_in, kind)
    made: dict[str, Array] = {}

    def codes_init(rng: Array, *_: Any) -> Array:
        w = nn.initializers.normal(0.02)(rng, shape, jnp.float32)
        made["codes"], made["scale"] = quantize(w, 0, n_in, kind)
        return made["codes"]

    codes = module.param("kernel", nn.with_logical_partitioning(codes_init, (axes[0], *axes[n_in:])))
    scales = module.param(
        "kernel_scale",
        nn.with_logical_partitioning(lambda *_: made["scale"].astype(param_dtype), (None, *axes[n_in:])),
    )
    return dequantize(codes, scales, shape, n_in, kind, dtype)


# ------------------------------------------------------------------------ trees of params


def _is_adapter(path: tuple) -> bool:
    return bool(path) and getattr(path[-1], "key", None) in ADAPTERS


def _is_trainable(path: tuple) -> bool:
    """An adapter, or a leaf of the policy's aux heads (a head trains in full, as a reward head)."""
    return _is_adapter(path) or getattr(path[0], "key", None) == AUX_HEADS


def has_adapters(params: Any) -> bool:
    """Whether ``params`` hold LoRA adapters anywhere."""
    if isinstance(params, Mapping):
        return any(k in ADAPTERS or has_adapters(v) for k, v in params.items())
    return False


def strip_adapters(params: Any) -> Any:
    """``params`` without their ``lora_a``/``lora_b`` leaves: the base model (LoRA's reference)."""
    if isinstance(params, Mapping):
        return {k: strip_adapters(v) for k, v in params.items() if k not in ADAPTERS}
    return params


def reference_params(params: Any, ref_params: Any) -> Any:
    """The params the reference forward runs: ``ref_params`` (a frozen copy, an EMA, another model's
    params), or where the state holds none (``None``: LoRA) the policy's own base weights, the
    adapters removed."""
    return strip_adapters(params) if ref_params is None else ref_params


def trainable_mask(params: Any) -> Any:
    """``params``' tree of bools, False on the frozen base of a LoRA decoder (every leaf but the
    adapters and aux heads of a subtree that has an ``embedding`` and adapters); True elsewhere (a
    reward model's head)."""
    if isinstance(params, Mapping):
        if "embedding" in params and has_adapters(params):
            return jax.tree_util.tree_map_with_path(lambda p, _: _is_trainable(p), dict(params))
        return {k: trainable_mask(v) for k, v in params.items()}
    return jax.tree.map(lambda _: True, params)


def partition(params: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)``: two trees shaped like ``params`` with None where the other holds the
    leaf; without adapters ``(params, None)``."""
    if not has_adapters(params):
        return params, None
    mask = trainable_mask(params)
    trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """The inverse of :func:`partition`."""
    if frozen is None:
        return trainable
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def trainable_part(params: Any) -> Any:
    """The trainable leaves of ``params`` (any tree shaped like the params, e.g. their shardings)."""
    if not has_adapters(params):
        return params
    return jax.tree.map(lambda p, m: p if m else None, params, trainable_mask(params))


def count(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ------------------------------------------------------------------- attaching and merging


def _get(tree: Any, keys: tuple) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _keys(path: tuple) -> tuple:
    return tuple(getattr(k, "key", k) for k in path)


def attach(model: Any, base: Any, rng: Array) -> Any:
    """Base decoder params (no adapters, float kernels; e.g. loaded from HF) -> the params of
    ``model`` (its config has ``lora``): fresh adapters from ``rng``, targeted kernels quantized
    where ``lora.quantize`` says so, every other leaf ``base``'s. Sharded as ``model.shardings()``."""
    lora = model.config.lora
    shardings = model.shardings() if model.mesh is not None else None

    def build(base: Any, rng: Array) -> Any:
        fresh = nn.unbox(model._boxed_init(rng))  # only the adapters survive dead-code elimination

        def leaf(path: tuple, new: Array) -> Array:
            keys = _keys(path)
            if keys[-1] in ADAPTERS:
                return new
            if lora.quantize != "none" and keys[-1] in ("kernel", "kernel_scale"):
                parent = _get(fresh, keys[:-1])
                if "kernel_scale" in parent:
                    w = _get(base, (*keys[:-1], "kernel"))
                    n_lead = 1 if keys[0] == "layers" else 0
                    n_in = w.ndim - parent["kernel"].ndim + 1
                    codes, scales = quantize(w, n_lead, n_in, lora.quantize)
                    return codes if keys[-1] == "kernel" else scales.astype(new.dtype)
            return _get(base, keys)

        return jax.tree_util.tree_map_with_path(leaf, fresh)

    fn = jax.jit(build) if shardings is None else jax.jit(build, out_shardings=shardings)
    return fn(base, rng)


def _targets(params: Any) -> list[tuple]:
    """Key paths of the projections (dicts with a ``kernel``) in a decoder's params."""
    out = []
    for k, v in params.items():
        if isinstance(v, Mapping):
            out += [(k,) + p for p in _targets(v)] if "kernel" not in v else [(k,)]
    return out


def proj_shapes(config: ModelConfig, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input dims, output dims) of the kernel of projection ``name`` (``transformer.Proj``)."""
    c = config
    D, H, K, Dh, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    return {
        "q_proj": ((D,), (H, Dh)),
        "k_proj": ((D,), (K, Dh)),
        "v_proj": ((D,), (K, Dh)),
        "o_proj": ((H, Dh), (D,)),
        "gate_proj": ((D,), (F,)),
        "up_proj": ((D,), (F,)),
        "down_proj": ((F,), (D,)),
    }[name]


def merged_kernel(
    proj: Mapping[str, Array], lora: LoraConfig, n_lead: int, dtype: Any, shapes: tuple[tuple, tuple]
) -> Array:
    """One projection's float kernel: dequantized where quantized, plus ``s A B`` where adapted."""
    in_shape, out_shape = shapes
    shape, n_in = (*in_shape, *out_shape), len(in_shape)
    if "kernel_scale" in proj:
        fn = lambda c, s: dequantize(c, s, shape, n_in, lora.quantize, jnp.float32)  # noqa: E731
        for _ in range(n_lead):
            fn = jax.vmap(fn)
        w = fn(proj["kernel"], proj["kernel_scale"])
    else:
        w = proj["kernel"].astype(jnp.float32)
    if "lora_a" in proj:
        a, b = proj["lora_a"].astype(jnp.float32), proj["lora_b"].astype(jnp.float32)
        lead = a.shape[:n_lead]
        a2 = a.reshape(*lead, -1, a.shape[-1])
        b2 = b.reshape(*lead, b.shape[n_lead], -1)
        w = w + (lora.scale * (a2 @ b2)).reshape(w.shape)
    return w.astype(dtype)


def merge(config: ModelConfig, params: Any) -> Any:
    """Decoder params with every adapter folded into its kernel (``W + s A B``, quantized kernels
    dequantized), in the param dtype: the plain decoder of ``config.replace(lora=None)``."""
    if config.lora is None:
        return params
    n_lead = 1 if config.scan_layers else 0
    dtype = jnp.dtype(config.param_dtype)

    def fold(params: Any) -> Any:
        out = strip_adapters(params)
        for path in _targets(params):
            proj = _get(params, path)
            if "lora_a" in proj or "kernel_scale" in proj:
                node = _get(out, path[:-1])
                node[path[-1]] = {
                    **{k: v for k, v in node[path[-1]].items() if k != "kernel_scale"},
                    "kernel": merged_kernel(proj, config.lora, n_lead, dtype, proj_shapes(config, path[-1])),
                }
        return out

    return jax.jit(fold)(params)


# ------------------------------------------------------------------------------ PEFT's format


def peft_tensors(config: ModelConfig, params: Any) -> dict[str, Callable[[], np.ndarray]]:
    """PEFT's adapter tensors of decoder ``params``, each fetched on call (a collective on several
    processes): ``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight`` [r, in]
    = ``A`` flattened and transposed, ``lora_B.weight`` [out, r] = ``B`` likewise (HF's flattening
    of heads, as ``alignjax.models.hf.tensor_maps``)."""
    out: dict[str, Callable[[], np.ndarray]] = {}
    for i in range(config.num_layers):
        layer = params["layers"] if config.scan_layers else params[f"layers_{i}"]
        for parent in ("self_attn", "mlp"):
            for name, proj in sorted(layer[parent].items()):
                if "lora_a" not in proj:
                    continue
                pre = f"base_model.model.model.layers.{i}.{parent}.{name}"

                def fetch(x: Array, i: int = i, which: str = "a") -> np.ndarray:
                    x = gather_to_host(x, np.dtype(np.float32))
                    x = x[i] if config.scan_layers else x
                    r = config.lora.rank
                    two = x.reshape(-1, r) if which == "a" else x.reshape(r, -1)
                    return np.ascontiguousarray(two.T)

                out[f"{pre}.lora_A.weight"] = lambda x=proj["lora_a"], f=fetch: f(x, which="a")
                out[f"{pre}.lora_B.weight"] = lambda x=proj["lora_b"], f=fetch: f(x, which="b")
    return out


def peft_config(config: ModelConfig, params: Any, base_model: str = "") -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the adapters in ``params`` (a causal LM's)."""
    names = sorted({k.split(".")[-3] for k in peft_tensors(config, params)})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.lora.rank,
        "lora_alpha": config.lora.alpha,
        "lora_dropout": config.lora.dropout,
        "target_modules": names,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }


def save_peft(model: Any, params: Any, path: Any, *, base_model: str = "") -> list[str]:
    """Writes the adapters of ``params`` to ``path`` (local or ``gs://``) in PEFT's format:
    ``adapter_config.json`` + ``adapter_model.safetensors`` (fp32), which
    ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), path)`` loads onto
    the base model (``base_model``: its name or directory, recorded in the config). The base is the
    model the run started from; a QLoRA run's base is its dequantized weights
    (:func:`merge` of the params without adapters, what ``save_pretrained`` writes for them).
    Every process calls this (the gathers are collective); process 0 writes."""
    import json

    from safetensors.numpy import save

    config = model.config
    if config.lora is None or not has_adapters(params):
        raise ValueError("save_peft: the model has no LoRA adapters (config.model.lora.rank is 0)")
    tensors = {name: fetch() for name, fetch in peft_tensors(config, params).items()}
    if jax.process_index() != 0:
        return []
    out = storage.path(path)
    out.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(out / "adapter_model.safetensors", save(tensors, metadata={"format": "pt"}))
    cfg = json.dumps(peft_config(config, params, base_model), indent=2) + "\n"
    storage.write_text(out / "adapter_config.json", cfg)
    return ["adapter_config.json", "adapter_model.safetensors"]


# ----------------------------------------------------------------------- checkpoints


def trainable_tree(params: Any) -> Any:
    """``params`` pruned to their trainable leaves (nested dicts; what a LoRA checkpoint holds);
    ``params`` themselves without adapters."""
    if not has_adapters(params):
        return params
    return _prune(trainable_part(params))


def _prune(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        kept = {k: _prune(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None and not (isinstance(v, dict) and not v)}
    return tree


def frozen_part(params: Any) -> Any:
    """The frozen leaves of ``params`` (pruned), ``{}`` without adapters."""
    if not has_adapters(params):
        return {}
    return _prune(jax.tree.map(lambda p, m: None if m else p, params, trainable_mask(params)))


def fill_frozen(trainable: Any, full: Any) -> Any:
    """``full`` with every leaf that ``trainable`` (a :func:`trainable_tree`) holds taken from it."""
    if isinstance(full, Mapping):
        sub = trainable if isinstance(trainable, Mapping) else {}
        return {k: fill_frozen(sub[k], v) if k in sub else v for k, v in full.items()}
    return trainable
