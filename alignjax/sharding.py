"""Meshes, logical axis rules and global arrays: one code path from one CPU device to a pod.

Parameters and activations are annotated with *logical* axis names (``"embed"``, ``"mlp"``,
``"heads"``, ...). A config's ``rules`` map each logical name to a mesh axis (or ``None`` for
replicated), in the MaxText style, so the same model shards differently on a different slice by
changing config only. The mesh always has the three axes ``data``, ``fsdp`` and ``tensor``:

* ``data``   - pure data parallelism (parameters replicated);
* ``fsdp``   - data parallelism with parameters and optimizer state sharded (ZeRO-3);
* ``tensor`` - Megatron-style tensor parallelism (heads, MLP and vocabulary split).

The batch dimension is split over ``("data", "fsdp")``.

Every alignjax mesh has ``Auto`` axis types: sharding is propagated by XLA from the constraints the
model places by logical name. A mesh from ``jax.make_mesh`` (``Explicit`` axes by default in current
JAX) or with ``Manual`` axes is accepted wherever a mesh is, through :func:`normalize_mesh`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or tuple of axes, or None). Activations use "batch", "length",
# "act_embed", ...; parameters use "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm".
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),
    ("value", None),
)


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves ``{"data": -1, "fsdp": 2, "tensor": 1}`` to concrete sizes (-1 takes the rest).

    Raises a ValueError naming the config key when the sizes do not tile ``num_devices``.
    """
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(
            f"config.mesh has unknown axes {sorted(unknown)}; valid axes are {list(MESH_AXES)}"
        )
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh may set at most one axis to -1, got {dict(axis_sizes)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
        raise ValueError(
            f"config.mesh={dict(axis_sizes)} does not tile {num_devices} devices "
            f"(the product of the fixed axes, {fixed}, must divide it)"
        )
    if free:
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"config.mesh={dict(axis_sizes)} uses {fixed} devices but {num_devices} are present; "
            "set one axis to -1 to take the rest"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(axis_sizes: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ``(data, fsdp, tensor)`` mesh from ``config.mesh`` over all (global) devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(dict(axis_sizes or {"data": -1}), len(devices))
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, ValueError, NotImplementedError):
        # Topology-aware placement is for TPU/GPU; CPU devices simply go in order.
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def normalize_mesh(mesh: Mesh | None) -> Mesh | None:
    """``mesh`` as an alignjax mesh: the same devices and axis names, every axis type ``Auto``.

    The model's activation constraints (``with_sharding_constraint`` by logical name) may only name
    Auto axes, so a ``jax.make_mesh`` mesh (Explicit axes by default) or a Manual one is rebuilt
    with Auto axes; JAX caches meshes, so equal inputs give the identical mesh. Raises a ValueError
    naming the missing or unknown axes when ``mesh`` is not a ``(data, fsdp, tensor)`` mesh.
    ``None`` (no mesh: one device) passes through.
    """
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh with axes {MESH_AXES} (a concrete mesh, with devices), "
            f"got {type(mesh).__name__}"
        )
    names = tuple(mesh.axis_names)
    missing = [a for a in MESH_AXES if a not in names]
    unknown = [a for a in names if a not in MESH_AXES]
    if missing or unknown:
        problems = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
        raise ValueError(
            f"mesh axes {names} must be exactly {MESH_AXES} ({', '.join(problems)}); "
            "build it with alignjax.sharding.make_mesh or jax.make_mesh(shape, "
            f"{MESH_AXES}) (an axis of size 1 is fine)"
        )
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, names, axis_types=(AxisType.Auto,) * len(names))


def rules_from_config(rules: Any = None) -> tuple[tuple[str, Any], ...]:
    """Returns logical axis rules; ``rules`` (a list of pairs or a mapping) overrides the defaults."""
    if rules is None:
        return DEFAULT_RULES
    items = rules.items() if hasattr(rules, "items") else rules
    override = {name: (tuple(axes) if isinstance(axes, list) else axes) for name, axes in items}
    merged = dict(DEFAULT_RULES)
    merged.update(override)
    return tuple(merged.items())


def logical_to_spec(
    logical_axes: Sequence[str | None], rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec, never using one mesh axis twice in a spec."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
        free = tuple(a for a in axes_tuple if a not in used)
        used.update(free)
        spec.append(None if not free else free[0] if len(free) == 1 else free)
    return PartitionSpec(*spec)


def logical_sharding(
    mesh: Mesh, logical_axes: Sequence[str | None], rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> NamedSharding:
    """NamedSharding for an array whose dimensions carry ``logical_axes``."""
    return NamedSharding(normalize_mesh(mesh), logical_to_spec(logical_axes, rules))


def tree_shardings(mesh: Mesh, logical_axes: Any, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a pytree whose leaves are tuples of logical axis names (e.g. a model's params)."""
    return jax.tree.map(
        lambda axes: logical_sharding(mesh, axes, rules), logical_axes, is_leaf=lambda x: isinstance(x, tuple)
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` x ``fsdp``; the rest replicated."""
    return NamedSharding(normalize_mesh(mesh), PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(normalize_mesh(mesh), PartitionSpec())


def global_batch(
    mesh: Mesh, host_batch: Mapping[str, np.ndarray], *, stacked: bool = False
) -> dict[str, jax.Array]:
    """Assembles each process's host-local batch into global arrays sharded over the batch axes.

    Every process passes its own rows (its shard of the global batch, leading dimension, or the
    second one after a leading micro-batch axis when ``stacked``); the global row count is the sum
    over processes. On one process this is a device_put. Sequence ids must already be global
    (:func:`global_sequence_ids`).
    """
    mesh = normalize_mesh(mesh)
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    lead = 1 if stacked else 0
    out = {}
    for key, value in host_batch.items():
        value = np.asarray(value)
        if value.ndim <= lead:
            raise ValueError(f"global_batch: batch[{key!r}] is a scalar; every entry needs a batch dimension")
        global_rows = value.shape[lead] * jax.process_count()
        if global_rows % shards:
            raise ValueError(
                f"global_batch: batch[{key!r}] has {value.shape[lead]} rows on each of {jax.process_count()} "
                f"process(es), {global_rows} in all, which the {shards} batch shards (mesh data x fsdp) "
                "do not divide; make the global batch size a multiple of data * fsdp"
            )
        spec = PartitionSpec(*([None] * lead), BATCH_AXES, *([None] * (value.ndim - 1 - lead)))
        out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
    return out


def global_sequence_ids(
    host_batch: Mapping[str, np.ndarray], examples: int | None = None
) -> dict[str, np.ndarray]:
    """Process-local sequence ids -> global ones. Sequences are numbered part-major (``0..B-1``
    chosen, ``B..2B-1`` rejected, then rationales or listwise candidates, over all processes): local
    id ``j b + i`` of part ``j`` becomes ``j B + p b + i`` with ``B = n b``, ``b`` this process's
    ``examples`` (default: the length of its per-example arrays)."""
    p, n = jax.process_index(), jax.process_count()
    if n == 1:
        return dict(host_batch)
    lengths = host_batch.get("chosen_lengths", host_batch.get("lengths"))
    if examples is not None:
        b = examples
    elif lengths is not None:
        b = len(lengths)
    else:
        b = next(len(v) for v in host_batch.values() if np.ndim(v) == 1)
    ids = np.asarray(host_batch["example_ids"])
    part, i = ids // b, ids % b
    return dict(host_batch, example_ids=np.where(ids >= 0, part * n * b + p * b + i, -1).astype(np.int32))


def process_share(items: Sequence[Any]) -> list[Any]:
    """This process's contiguous share of ``items`` (a global batch every process holds whole), for
    :func:`global_batch`; ``len(items)`` must divide by the process count."""
    p, n = jax.process_index(), jax.process_count()
    if len(items) % n:
        raise ValueError(f"a batch of {len(items)} examples does not divide over {n} processes")
    size = len(items) // n
    return list(items[p * size : (p + 1) * size])


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts multi-process JAX. On TPU pods all arguments are discovered; on CPU they are required.

    CPU collectives across processes go through gloo, which must be chosen before initialisation.
    """
    if num_processes is not None and num_processes <= 1:
        return
    if jax.config.jax_platforms in (None, "", "cpu") or (jax.config.jax_platforms or "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def gather_to_host(x: jax.Array, dtype: np.dtype) -> np.ndarray:
    """One param to host in ``dtype``; cast on device first (half the traffic for bf16). With several
    processes every process joins the all-gather and receives this one tensor."""
    x = x.astype(dtype) if isinstance(x, jax.Array) else np.asarray(x).astype(dtype)
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    whole = _resharder(_one_copy_per_host(x))(x)
    host = np.empty(x.shape, x.dtype)
    for shard in whole.addressable_shards:
        host[shard.index] = np.asarray(shard.data)
    return host


@functools.cache
def _resharder(sharding: jax.sharding.NamedSharding) -> Callable[[jax.Array], jax.Array]:
    """One jitted identity per target sharding, so a layer's tensors compile it once, not per layer."""
    return jax.jit(lambda a: a, out_shardings=sharding)


def _one_copy_per_host(x: jax.Array) -> jax.sharding.NamedSharding:
    """Replicated across processes and split across each process's devices along the dimension
    ``x`` is already split along (so the reshard is an all-gather between hosts, no full replica)."""
    hosts = sorted({d.process_index for d in jax.devices()})
    grid = np.array([[d for d in jax.devices() if d.process_index == p] for p in hosts])
    local = grid.shape[1]
    split = x.sharding.shard_shape(x.shape)
    axes = [a for a, (n, k) in enumerate(zip(x.shape, split)) if k < n and n % local == 0]
    axes += [a for a, n in enumerate(x.shape) if n % local == 0]
    spec = [None] * x.ndim
    if axes:
        spec[axes[0]] = "local"
    return NamedSharding(Mesh(grid, ("hosts", "local")), PartitionSpec(*spec))
