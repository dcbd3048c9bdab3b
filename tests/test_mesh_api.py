"""Meshes built with JAX's own ``jax.make_mesh`` (Explicit axis types by default, or Explicit / Auto /
Manual given) work wherever an ``alignjax.sharding.make_mesh`` mesh does: HF import, the forward,
log-probs and their gradient (what the train step differentiates), and KV-cache generation give the
alignjax mesh's results; a mesh without the ``(data, fsdp, tensor)`` axes fails with one line naming
the missing and unknown axes, before anything compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from alignjax import logprobs as lp
from alignjax import sharding
from alignjax.models import from_pretrained
from alignjax.search.generate import Generator
from tests import hf_fixtures

SHAPE = (2, 2, 2)
ROWS, T, VOCAB = 8, 12, 96


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    hf_fixtures.save_llama(path, vocab_size=VOCAB, seed=0)
    return path


def _batch() -> dict[str, np.ndarray]:
    """Padded rows of varying length; each row is one sequence whose tokens after the third count."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, T + 1, size=ROWS)
    t = np.arange(T)[None, :]
    valid = t < lengths[:, None]
    return dict(
        input_ids=np.where(valid, rng.integers(1, VOCAB, size=(ROWS, T)), 0).astype(np.int32),
        positions=np.broadcast_to(t, (ROWS, T)).astype(np.int32),
        segment_ids=valid.astype(np.int32),
        loss_mask=(valid & (t >= 3)).astype(np.float32),
        example_ids=np.where(valid, np.arange(ROWS)[:, None], -1).astype(np.int32),
    )


def _results(path: str, mesh) -> dict[str, np.ndarray]:
    model = from_pretrained(path, mesh=mesh)
    batch = sharding.global_batch(mesh, _batch())

    @jax.jit
    def forward(params, batch):
        logits = model.apply(
            params, batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"]
        )

        def total(p):
            seq, _ = lp.batch_sequence_logps(model, p, batch, ROWS)
            return jnp.sum(seq), seq

        (_, seq), grads = jax.value_and_grad(total, has_aux=True)(params)
        return logits, seq, grads

    logits, seq, grads = forward(model.params, batch)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    generation = Generator(model, min_prompt_bucket=8).generate(
        model.params, [[1, 5, 9], [2, 7]], jax.random.PRNGKey(0), greedy=True, max_new_tokens=4
    )
    return {
        "logits": np.asarray(logits),
        "sequence_logps": np.asarray(seq),
        **{f"grad{jax.tree_util.keystr(k)}": np.asarray(g) for k, g in leaves},
        "tokens": generation.tokens,
        "token_logps": generation.logps,
    }


@pytest.fixture(scope="module")
def alignjax_mesh_results(llama_dir):
    return _results(llama_dir, sharding.make_mesh(dict(zip(sharding.MESH_AXES, SHAPE))))


@pytest.mark.parametrize(
    "axis_types",
    [None, (AxisType.Explicit,) * 3, (AxisType.Auto,) * 3, (AxisType.Manual,) * 3],
    ids=["default", "explicit", "auto", "manual"],
)
def test_jax_make_mesh_gives_the_alignjax_mesh_results(llama_dir, alignjax_mesh_results, axis_types):
    mesh = jax.make_mesh(SHAPE, sharding.MESH_AXES, axis_types=axis_types)
    got = _results(llama_dir, mesh)
    want = alignjax_mesh_results
    assert sorted(got) == sorted(want)
    assert want["sequence_logps"].max() < -1.0  # real log-probs of several tokens each
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_normalize_mesh_keeps_devices_and_names_with_auto_axes():
    for axis_types in (None, (AxisType.Explicit,) * 3, (AxisType.Manual,) * 3):
        mesh = jax.make_mesh((4, 1, 2), ("tensor", "data", "fsdp"), axis_types=axis_types)
        got = sharding.normalize_mesh(mesh)
        assert got.axis_names == mesh.axis_names and got.axis_types == (AxisType.Auto,) * 3
        assert (got.devices == mesh.devices).all()
    auto = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.normalize_mesh(auto) is auto
    assert sharding.normalize_mesh(None) is None


def test_preset_init_on_a_jax_mesh_shards_as_on_the_alignjax_mesh():
    want = from_pretrained("tiny", mesh=sharding.make_mesh(dict(zip(sharding.MESH_AXES, SHAPE))))
    got = from_pretrained("tiny", mesh=jax.make_mesh(SHAPE, sharding.MESH_AXES))
    assert got.mesh.axis_types == (AxisType.Auto,) * 3
    for g, w in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        assert g.sharding.is_equivalent_to(w.sharding, g.ndim)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize(
    "names, shape, message",
    [
        (("batch",), (8,), r"missing \['data', 'fsdp', 'tensor'\], unknown \['batch'\]"),
        (("data", "model"), (4, 2), r"missing \['fsdp', 'tensor'\], unknown \['model'\]"),
        (("data", "fsdp", "tensor", "expert"), (2, 2, 2, 1), r"unknown \['expert'\]"),
    ],
)
def test_wrong_axis_names_fail_with_one_line_before_compile(llama_dir, names, shape, message):
    mesh = jax.make_mesh(shape, names)
    with pytest.raises(ValueError, match=message) as err:
        from_pretrained(llama_dir, mesh=mesh)
    assert "\n" not in str(err.value) and "jax.make_mesh" in str(err.value)
    with pytest.raises(ValueError, match=message):
        from_pretrained("tiny", mesh=mesh)  # a preset's random init
    with pytest.raises(ValueError, match=message):
        sharding.global_batch(mesh, _batch())
