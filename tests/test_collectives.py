"""The sharded embedding lookup (``transformer.embed_lookup``): the same rows and gradients as one
device, and a DPO step whose partitioning needs no full rematerialisation and whose collectives stay
within what fsdp / data / tensor parallelism needs (``bench/collectives.py``'s budget)."""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import sharding
from alignjax.models import PRESETS, Model
from alignjax.models.transformer import embed_lookup

# bench/ is a folder of scripts, not a package: load the benchmark by path.
_PATH = os.path.join(os.path.dirname(__file__), "..", "bench", "collectives.py")
_SPEC = importlib.util.spec_from_file_location("alignjax_bench_collectives", _PATH)
bcol = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bcol
_SPEC.loader.exec_module(bcol)

TINY = PRESETS["tiny"].replace(num_layers=1)
MESHES = [{"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 4, "tensor": 2}]


def _loss(model: Model, params, ids):
    """Next-token cross-entropy of the full model (the lookup's gradient flows into every weight)."""
    logp = jax.nn.log_softmax(model.apply(params, ids)[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def _forward_and_grads(model: Model):
    """One program: the looked-up rows, the hidden state, the loss and its gradients."""

    def run(params, ids):
        rows = embed_lookup(params["embedding"], ids, model.mesh, model.rules)
        loss, grads = jax.value_and_grad(lambda p: _loss(model, p, ids))(params)
        return rows, model.hidden(params, ids), loss, grads

    return jax.jit(run)


@pytest.fixture(scope="module")
def params():
    return Model(TINY).init(jax.random.PRNGKey(0))


@pytest.mark.parametrize(
    "axes,rows",
    [({"data": 2, "fsdp": 2, "tensor": 2}, 8), ({"fsdp": 4, "tensor": 2}, 8), ({"fsdp": 8}, 2)],
    ids=["2x2x2", "fsdp4-tensor2", "fsdp8-2-rows"],
)
def test_mesh_lookup_forward_loss_and_grads_match_one_device(axes, rows, params):
    """The looked-up rows bitwise equal ``jnp.take`` on one device, and the model's hidden state,
    loss and every gradient equal the 1-device run's to fp32 tolerance. 2 rows do not split over
    fsdp, so there the rows stay embed-split in the lookup and are gathered after it."""
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, size=(rows, 12)).astype(np.int32)
    ids[0, :4] = 7  # a repeated token: its gradient rows are summed
    want_rows, want_hidden, want_loss, want_grads = _forward_and_grads(Model(TINY))(params, ids)
    np.testing.assert_array_equal(want_rows, np.asarray(params["embedding"])[ids])
    mesh = sharding.make_mesh(axes)
    model = Model(TINY, mesh=mesh)
    split = rows % 8 == 0
    x = jax.device_put(ids, sharding.batch_sharding(mesh, 2) if split else sharding.replicated(mesh))
    got_rows, hidden, loss, grads = _forward_and_grads(model)(jax.device_put(params, model.shardings()), x)
    np.testing.assert_array_equal(np.asarray(got_rows), np.asarray(want_rows))
    np.testing.assert_allclose(hidden, want_hidden, atol=2e-6)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    flat_want = jax.tree_util.tree_leaves(want_grads)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), flat_want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def no_compilation_cache():
    """A compile served from the persistent cache (tests/conftest.py) would run no SPMD partitioner
    and so print no warning."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", before)


@pytest.mark.parametrize("logit_width", [None, 8], ids=["head-everywhere", "head-at-counted"])
@pytest.mark.parametrize("axes", [{"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}], ids=["fsdp8", "2x2x2"])
def test_dpo_step_has_no_full_remat_and_collectives_within_budget(axes, logit_width, no_compilation_cache):
    """The compiled DPO step: no "Involuntary full rematerialization" in XLA's log (the embedding
    gather printed it on (2, 2, 2) before the lookup was placed by hand), no all-to-all or permute
    beyond the lookup's own, and every kind's bytes within the budget, whose weight all-gathers
    leave out the embedding table (one gather of it would exceed it: the tiny step gathers every
    other fsdp weight exactly three times). ``head-at-counted``: the head at the 8 completion tokens
    of each 16-token row (``StepSpec.logit_width``), whose gathers along the unsplit length axis
    must stay local."""
    r = bcol.compile_step(TINY, axes, pairs=4, length=16, strict=False, logit_width=logit_width)
    assert r["warnings"] == [], r["warnings"][:2]
    collectives = bcol.count_collectives(r["hlo"], len(jax.devices()))
    result = dict(
        measured=bcol.totals(collectives),
        budget={op: sum(v.values()) for op, v in bcol.budget(r["model"], r["mesh"], r["rows"], 16).items()},
    )
    assert bcol.over_budget(result) == [], result
    # the lookup's all-to-alls (both forwards, the backward) do run: the budget is not vacuous
    assert result["measured"]["all-to-all"]["count"] == 3
    assert result["measured"]["all-gather"]["payload"] > 0.5 * result["budget"]["all-gather"]


def test_hlo_counting_reads_replica_groups_and_loop_trip_counts():
    """The three replica-group spellings of compiled HLO, tuple results, and a collective inside a
    while body counted once per iteration."""
    hlo = """
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%add
}

ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  %ag = f32[4,4]{1,0} all-gather(%a), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %t = (f32[2]{0}, bf16[2,2]{1,0}) all-reduce(%b, %c), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, to_apply=%add
  %one = f32[4]{0} all-reduce(%d), channel_id=4, replica_groups={{0},{1}}, to_apply=%add
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
}
"""  # noqa: E501
    got = bcol.count_collectives(hlo, 8)
    assert [(c["op"], c["payload"], c["group"], c["times"]) for c in got] == [
        ("all-reduce", 32, 2, 3),
        ("all-gather", 64, 4, 1),
        ("all-reduce", 16, 2, 1),
    ]
    totals = bcol.totals(got)
    assert totals["all-reduce"]["count"] == 4 and totals["all-reduce"]["payload"] == 3 * 32 + 16
    assert totals["all-gather"]["wire"] == 64 * 3 / 4
