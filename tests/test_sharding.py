"""alignjax.sharding unit tests, and shard invariance of log-probs and their gradients.

The invariance tests run the tiny decoder (``alignjax.models.from_pretrained("tiny")``) on one
device and on the 8-device CPU mesh for several (data, fsdp, tensor) shapes and require equal
sequence log-probs and equal parameter gradients (tolerance 1e-5), for the dense and the
vocabulary-chunked log-prob paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from alignjax import logprobs as lp
from alignjax import sharding

# ------------------------------------------------------------------------------ sharding.py units


@pytest.mark.parametrize(
    "sizes,want",
    [
        ({"data": -1}, (8, 1, 1)),
        ({}, (8, 1, 1)),
        ({"data": -1, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
        ({"data": 1, "fsdp": -1, "tensor": 2}, (1, 4, 2)),
        ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
        ({"tensor": -1}, (1, 1, 8)),
    ],
)
def test_mesh_shape_resolves(sizes, want):
    assert sharding.mesh_shape(sizes or {"data": -1}, 8) == want


@pytest.mark.parametrize(
    "sizes,match",
    [
        ({"data": -1, "model": 2}, "unknown axes \\['model'\\]"),
        ({"data": -1, "fsdp": -1}, "at most one axis"),
        ({"data": -1, "fsdp": 3}, "does not tile 8 devices"),
        ({"data": 0, "fsdp": -1}, "does not tile"),
        ({"data": -2}, "does not tile"),
        ({"data": 2, "fsdp": 2}, "uses 4 devices but 8 are present"),
    ],
)
def test_mesh_shape_errors_name_the_config(sizes, match):
    with pytest.raises(ValueError, match=match) as err:
        sharding.mesh_shape(sizes, 8)
    assert "config.mesh" in str(err.value)


def test_make_mesh_axes_and_devices():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.devices.shape == (2, 2, 2)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_logical_to_spec():
    P = PartitionSpec
    assert sharding.logical_to_spec(("batch", "length", "act_vocab")) == P(("data", "fsdp"), None, "tensor")
    assert sharding.logical_to_spec(("embed", "vocab")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec((None, "mlp")) == P(None, "tensor")
    # One mesh axis is never used twice in a spec: the second "tensor" falls back to replicated.
    assert sharding.logical_to_spec(("heads", "mlp")) == P("tensor", None)
    # A partially used tuple keeps its free axes.
    assert sharding.logical_to_spec(("embed", "batch")) == P("fsdp", "data")
    with pytest.raises(KeyError, match="'nonsense'"):
        sharding.logical_to_spec(("nonsense",))


def test_rules_from_config_overrides_defaults():
    rules = sharding.rules_from_config([("embed", None), ("batch", ["data"])])
    table = dict(rules)
    assert table["embed"] is None and table["batch"] == ("data",)
    assert table["vocab"] == "tensor"  # untouched defaults stay
    assert sharding.logical_to_spec(("batch", "embed"), rules) == PartitionSpec("data", None)
    assert sharding.rules_from_config(None) == sharding.DEFAULT_RULES


def test_global_batch_places_rows_over_data_and_fsdp():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    host = {"input_ids": np.arange(8 * 3, dtype=np.int32).reshape(8, 3), "w": np.arange(8, dtype=np.float32)}
    out = sharding.global_batch(mesh, host)
    for key, value in host.items():
        arr = out[key]
        assert arr.shape == value.shape and arr.dtype == value.dtype
        np.testing.assert_array_equal(np.asarray(arr), value)
        spec = PartitionSpec(("data", "fsdp"), *([None] * (value.ndim - 1)))
        assert arr.sharding == NamedSharding(mesh, spec)
    # Each device holds 2 of the 8 rows; devices that differ only along "tensor" hold the same rows.
    rows = {s.device.id: tuple(np.asarray(s.data)[:, 0]) for s in out["input_ids"].addressable_shards}
    assert all(len(r) == 2 for r in rows.values())
    assert len(set(rows.values())) == 4


def test_global_batch_error_names_key_and_sizes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match=r"batch\['loss_mask'\] has 6 rows.*4 batch shards"):
        sharding.global_batch(mesh, {"loss_mask": np.zeros((6, 4), np.float32)})


# ------------------------------------------------------------------------------ batch layouts

T = 24


def _empty(rows: int) -> dict[str, np.ndarray]:
    zeros = lambda: np.zeros((rows, T), np.int32)
    return dict(
        input_ids=zeros(),
        positions=zeros(),
        segment_ids=zeros(),
        branch_ids=zeros(),
        loss_mask=np.zeros((rows, T), np.float32),
        example_ids=np.full((rows, T), -1, np.int32),
    )


def padded_batch(seqs):
    """One sequence per row: seqs = [(prompt, completion, example_id)]."""
    b = _empty(len(seqs))
    for r, (p, c, n) in enumerate(seqs):
        k = len(p) + len(c)
        b["input_ids"][r, :k] = p + c
        b["positions"][r, :k] = np.arange(k)
        b["segment_ids"][r, :k] = 1
        b["loss_mask"][r, len(p) : k] = 1
        b["example_ids"][r, :k] = n
    return b


def packed_batch(rows):
    """rows = [[(prompt, completion, example_id), ...], ...]: segments back to back, positions restart."""
    b = _empty(len(rows))
    for r, segs in enumerate(rows):
        t = 0
        for s, (p, c, n) in enumerate(segs, start=1):
            k = len(p) + len(c)
            b["input_ids"][r, t : t + k] = p + c
            b["positions"][r, t : t + k] = np.arange(k)
            b["segment_ids"][r, t : t + k] = s
            b["loss_mask"][r, t + len(p) : t + k] = 1
            b["example_ids"][r, t : t + k] = n
            t += k
    return b


def shared_prompt_batch(pairs, num_pairs):
    """pairs = [(prompt, chosen, rejected, i)]: [prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected]."""
    b = _empty(len(pairs))
    for r, (p, c, rj, i) in enumerate(pairs):
        P = len(p)
        b["input_ids"][r, : P - 1] = p[:-1]
        b["positions"][r, : P - 1] = np.arange(P - 1)
        t = P - 1
        for branch, comp, n in ((1, c, i), (2, rj, num_pairs + i)):
            k = 1 + len(comp)
            b["input_ids"][r, t : t + k] = [p[-1]] + comp
            b["positions"][r, t : t + k] = np.arange(P - 1, P - 1 + k)
            b["branch_ids"][r, t : t + k] = branch
            b["loss_mask"][r, t + 1 : t + k] = 1
            b["example_ids"][r, t : t + k] = n
            t += k
        b["segment_ids"][r, :t] = 1
    return b


def _random_pairs(num_pairs: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    toks = lambda lo, hi: [int(x) for x in rng.integers(1, vocab, size=rng.integers(lo, hi))]
    return [(toks(2, 6), toks(1, 5), toks(1, 5)) for _ in range(num_pairs)]


def _cat(*batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ------------------------------------------------------------------------------ the tiny decoder


@pytest.fixture(scope="module")
def tiny():
    from alignjax.models import from_pretrained

    model = from_pretrained("tiny")
    # Replace the 0.02-scale init (near-uniform predictions, tiny gradients) by larger random
    # weights and non-unit norm scales, so every parameter's gradient is sizeable and a sharding
    # mistake anywhere would show.
    rng = np.random.default_rng(1)
    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if x.ndim == 1:  # norm scales
            return 1.0 + 0.2 * rng.normal(size=x.shape)
        if "embedding" in name:
            return rng.normal(size=x.shape)
        fan_in = x.shape[0] if "o_proj" not in name else x.shape[0] * x.shape[1]
        return rng.normal(size=x.shape) / np.sqrt(fan_in)

    params = jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(draw(p, x), jnp.float32), model.params)
    return model, params


@pytest.fixture(scope="module")
def mixed_batch(tiny):
    """8 rows, 12 sequences (pairs 0..5; chosen 0..5, rejected 6..11) in three layouts at once."""
    model, _ = tiny
    pairs = _random_pairs(6, model.config.vocab_size)
    n = len(pairs)
    shared = shared_prompt_batch([(p, c, r, i) for i, (p, c, r) in enumerate(pairs[:2])], n)
    packed = packed_batch(
        [[(pairs[2][0], pairs[2][1], 2), (pairs[2][0], pairs[2][2], n + 2)],
         [(pairs[3][0], pairs[3][2], n + 3), (pairs[3][0], pairs[3][1], 3)]]
    )
    padded = padded_batch(
        [(pairs[4][0], pairs[4][1], 4), (pairs[4][0], pairs[4][2], n + 4),
         (pairs[5][0], pairs[5][1], 5), (pairs[5][0], pairs[5][2], n + 5)]
    )
    return _cat(shared, packed, padded), pairs


def _objective(model, num_sequences, vocab_chunk, logit_width=None):
    """Sequence log-probs and d(sum_n c_n S_n)/d params (c_n fixed, distinct weights)."""
    coeff = jnp.linspace(-1.0, 1.5, num_sequences)

    def fn(params, batch):
        def loss(p):
            seq, _ = lp.batch_sequence_logps(
                model, p, batch, num_sequences, vocab_chunk=vocab_chunk, logit_width=logit_width
            )
            return jnp.sum(seq * coeff), seq

        (_, seq), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return seq, grads

    return jax.jit(fn)


def test_layouts_give_equal_sequence_logps_under_the_model(tiny, mixed_batch):
    # The same 12 sequences, each alone in a padded row, vs packed / shared-prompt rows.
    model, params = tiny
    batch, pairs = mixed_batch
    n = len(pairs)
    chosen = [(p, c, i) for i, (p, c, _) in enumerate(pairs)]
    rejected = [(p, r, n + i) for i, (p, _, r) in enumerate(pairs)]
    reference = padded_batch(chosen + rejected)
    fn = jax.jit(lambda prm, b: lp.batch_sequence_logps(model, prm, b, 2 * n)[0])
    want = fn(params, reference)
    got = fn(params, batch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(want) < -1.0)  # real, non-trivial log-probs


@pytest.fixture(scope="module")
def single_device(tiny, mixed_batch):
    model, params = tiny
    batch, pairs = mixed_batch
    n = 2 * len(pairs)
    device = jax.devices()[0]
    params1 = jax.device_put(params, device)
    batch1 = jax.device_put(batch, device)
    out = {}
    for chunk in (None, 96):
        seq, grads = _objective(model, n, chunk)(params1, batch1)
        out[chunk] = (np.asarray(seq), jax.tree.map(np.asarray, grads))
    # The chunked path is the same function.
    np.testing.assert_allclose(out[96][0], out[None][0], rtol=1e-5, atol=1e-5)
    return out


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)], ids=lambda s: "x".join(map(str, s)))
def test_logps_and_grads_are_shard_invariant(tiny, mixed_batch, single_device, shape):
    from alignjax.models import from_pretrained

    _, params = tiny
    batch, pairs = mixed_batch
    n = 2 * len(pairs)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    model = from_pretrained("tiny", mesh=mesh)  # activation constraints on this mesh
    param_shardings = model.shardings(mesh)
    sharded_params = jax.device_put(params, param_shardings)
    global_batch = sharding.global_batch(mesh, batch)
    # The parameters really are split (tensor: vocab/heads/mlp; fsdp: embed).
    if shape[2] > 1:
        assert sharded_params["lm_head"].sharding.spec[1] == "tensor"
    if shape[1] > 1:
        assert sharded_params["lm_head"].sharding.spec[0] == "fsdp"
    # Dense logits on (8,1,1) and (2,2,2); the vocabulary-chunked path (each device streaming its own
    # vocabulary shard) where "tensor" splits the vocabulary, (2,2,2) and (1,4,2).
    chunks = {(8, 1, 1): (None,), (2, 2, 2): (None, 96), (1, 4, 2): (96,)}[shape]
    # And each with the head at the counted tokens only (logit_width: the most any row holds),
    # against the single device's head at every position.
    width = int((np.asarray(batch["loss_mask"]) > 0).sum(axis=1).max())
    assert width < batch["input_ids"].shape[1]
    for chunk, logit_width in [(c, w) for c in chunks for w in (None, width)]:
        seq, grads = _objective(model, n, chunk, logit_width)(sharded_params, global_batch)
        want_seq, want_grads = single_device[chunk]
        np.testing.assert_allclose(np.asarray(seq), want_seq, rtol=1e-5, atol=1e-5)
        flat_got = jax.tree_util.tree_leaves_with_path(grads)
        flat_want = jax.tree.leaves(want_grads)
        assert len(flat_got) == len(flat_want)
        for (path, got), want in zip(flat_got, flat_want):
            assert np.abs(want).max() > 1e-3, jax.tree_util.keystr(path)  # a gradient worth comparing
            np.testing.assert_allclose(
                np.asarray(got), want, rtol=1e-5, atol=1e-5,
                err_msg=f"mesh {shape}, vocab_chunk={chunk}, logit_width={logit_width}, "
                f"grad {jax.tree_util.keystr(path)}",
            )
