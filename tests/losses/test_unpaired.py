"""KTO, APO-zero (unpaired) and BCO against NumPy formulas, with grads, jit and limits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from alignjax.losses import registry
from alignjax.losses.unpaired import (
    BCOState,
    apo_zero_unpaired,
    bco,
    bco_density_ratio,
    bco_update_state,
    kto,
    kto_kl_estimate,
)


def np_sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))  # overflow-free


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_kto(logps, ref, labels, kl, ref_kl, beta=0.1, wd=1.0, wu=1.0):
    z0 = max(0.0, float(np.mean(kl - ref_kl))) if len(kl) else 0.0
    u = logps - ref
    return np.where(labels, wd * (1 - np_sigmoid(beta * (u - z0))), wu * (1 - np_sigmoid(beta * (z0 - u))))


def np_bco(logps, ref, labels, delta, w=None, beta=0.1):
    r = beta * (logps - ref)
    w = np.ones_like(r) if w is None else w
    return np.where(labels, -np_log_sigmoid(r - delta), -w * np_log_sigmoid(-(r - delta)))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    b = 6
    logps = rng.normal(-20, 5, b)
    ref = logps + rng.normal(0, 3, b)
    kl = rng.normal(-25, 5, b)
    ref_kl = kl - np.abs(rng.normal(1, 1, b))  # positive mean: z0 > 0 is exercised
    labels = np.array([True, False, True, True, False, False])
    return dict(logps=logps, ref=ref, kl=kl, ref_kl=ref_kl, labels=labels)


@pytest.mark.parametrize("use_jit", [False, True])
def test_kto_matches_numpy(data, use_jit):
    d = data
    hp = dict(beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    fn = functools.partial(kto, **hp)
    fn = jax.jit(fn) if use_jit else fn
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = fn(f32(d["logps"]), f32(d["ref"]), d["labels"], f32(d["kl"]), f32(d["ref_kl"]))
    want = np_kto(d["logps"], d["ref"], d["labels"], d["kl"], d["ref_kl"], 0.3, 1.0, 1.5)
    assert got.shape == (6,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(kto_kl_estimate(f32(d["kl"]), f32(d["ref_kl"]))) > 0


def test_kto_kl_clamped_at_zero(data):
    d = data
    z0 = kto_kl_estimate(jnp.asarray(d["ref_kl"]), jnp.asarray(d["kl"]))  # negative mean -> 0
    assert float(z0) == 0.0


def test_kto_grads(data):
    d = data
    with jax.enable_x64(True):
        kl, ref_kl, labels = jnp.asarray(d["kl"]), jnp.asarray(d["ref_kl"]), d["labels"]
        f = lambda lp, rp: kto(lp, rp, labels, kl, ref_kl, beta=0.3, undesirable_weight=1.5)
        check_grads(f, (d["logps"], d["ref"]), order=1, modes=["rev"])
        # The documented objective treats z0 as a constant: analytic grad w.r.t. logps, z0 fixed.
        u = d["logps"] - d["ref"]
        z0 = max(0.0, np.mean(d["kl"] - d["ref_kl"]))
        s_d, s_u = np_sigmoid(0.3 * (u - z0)), np_sigmoid(0.3 * (z0 - u))
        want = np.where(labels, -0.3 * s_d * (1 - s_d), 1.5 * 0.3 * s_u * (1 - s_u))
        got = jax.grad(lambda lp: jnp.sum(f(lp, jnp.asarray(d["ref"]))))(jnp.asarray(d["logps"]))
        np.testing.assert_allclose(got, want, rtol=1e-10)
        lp, rp = jnp.asarray(d["logps"]), jnp.asarray(d["ref"])
        g_kl = jax.grad(lambda k: jnp.sum(kto(lp, rp, labels, k, ref_kl)))(kl)
        np.testing.assert_array_equal(g_kl, 0.0)


def test_kto_batch_size_one():
    lp, rp, lab = jnp.array([-3.0]), jnp.array([-4.0]), np.array([True])
    empty = jnp.zeros((0,), jnp.float32)
    got = kto(lp, rp, lab, empty, empty, beta=0.5)
    # K = 0: z0 = 0, so KTO equals apo_zero_unpaired.
    np.testing.assert_allclose(got, np_kto(np.array([-3.0]), np.array([-4.0]), lab, [], [], 0.5), rtol=1e-6)
    np.testing.assert_allclose(got, apo_zero_unpaired(lp, rp, lab, beta=0.5), rtol=1e-6)
    # K = 1 (a mismatched pair taken from elsewhere): z0 = max(0, kl - ref_kl).
    got1 = kto(lp, rp, lab, jnp.array([-5.0]), jnp.array([-7.0]), beta=0.5)
    np.testing.assert_allclose(got1, [1 - np_sigmoid(0.5 * (1.0 - 2.0))], rtol=1e-6)


def test_kto_no_desirable(data):
    d = data
    labels = np.zeros(6, bool)
    got = kto(d["logps"], d["ref"], labels, d["kl"], d["ref_kl"], beta=0.1, undesirable_weight=2.0)
    want = np_kto(d["logps"], d["ref"], labels, d["kl"], d["ref_kl"], 0.1, 1.0, 2.0)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(jnp.mean(got)) == pytest.approx(float(np.mean(want)), rel=1e-5)


def test_kto_extreme_and_bf16(data):
    d = data
    lp = jnp.full((6,), -1e4)
    got = kto(lp, jnp.zeros(6), d["labels"], jnp.full((6,), -1e4), jnp.zeros(6))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np_kto(np.full(6, -1e4), np.zeros(6), d["labels"], np.full(6, -1e4),
                                           np.zeros(6)), atol=1e-6)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    got_bf = kto(bf(d["logps"]), bf(d["ref"]), d["labels"], bf(d["kl"]), bf(d["ref_kl"]))
    assert got_bf.dtype == jnp.float32 and np.all(np.isfinite(got_bf))
    ref_bf = np_kto(*(np.asarray(bf(d[k]), np.float64) for k in ("logps", "ref")), d["labels"],
                    *(np.asarray(bf(d[k]), np.float64) for k in ("kl", "ref_kl")))
    np.testing.assert_allclose(got_bf, ref_bf, rtol=1e-5)


def test_apo_zero_unpaired_matches_numpy(data):
    d = data
    got = jax.jit(functools.partial(apo_zero_unpaired, beta=0.2))(d["logps"], d["ref"], d["labels"])
    u = d["logps"] - d["ref"]
    want = np.where(d["labels"], 1 - np_sigmoid(0.2 * u), np_sigmoid(0.2 * u))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_bco_state_two_calls_equals_running_mean(data, use_jit):
    d = data
    rng = np.random.default_rng(1)
    fn = functools.partial(bco, beta=0.2)
    fn = jax.jit(fn) if use_jit else fn
    state = bco.init_state()
    batches = [(d["logps"], d["ref"]), (d["logps"] + rng.normal(0, 2, 6), d["ref"])]
    seen = []
    for lp, rp in batches:
        losses, state = fn(lp, rp, d["labels"], state)
        seen.append(0.2 * (lp - rp))
        delta = np.mean(np.concatenate(seen))  # TRL RunningMoments: mean of every reward seen
        np.testing.assert_allclose(state.mean, delta, rtol=1e-5)
        np.testing.assert_allclose(losses, np_bco(lp, rp, d["labels"], delta, beta=0.2), rtol=1e-5)
    assert float(state.count) == 12.0
    assert isinstance(state, BCOState)


def test_bco_ema_eval_and_density_weights(data):
    d = data
    r1, r2 = np.array([1.0, 3.0]), np.array([5.0, 7.0, 9.0])
    s = bco_update_state(bco.init_state(), r1, ema_decay=0.9)
    np.testing.assert_allclose(s.mean, 2.0)  # first batch: its mean
    s = bco_update_state(s, r2, ema_decay=0.9)
    np.testing.assert_allclose(s.mean, 0.9 * 2.0 + 0.1 * 7.0, rtol=1e-6)
    assert float(s.count) == 5.0
    # update_state=False: delta = stored mean, state unchanged.
    state = BCOState(jnp.float32(0.7), jnp.float32(10.0))
    probs = np.array([0.1, 0.2, 0.5, 0.9, 0.95, 0.99])
    w = bco_density_ratio(probs)
    np.testing.assert_allclose(w, np.clip(probs / (1 - probs + 1e-8), 0.5, 10.0), rtol=1e-6)
    losses, new = bco(d["logps"], d["ref"], d["labels"], state, w, update_state=False)
    assert new is state
    want = np_bco(d["logps"], d["ref"], d["labels"], 0.7, np.asarray(w))
    np.testing.assert_allclose(losses, want, rtol=1e-5)


def test_bco_grads(data):
    d = data
    with jax.enable_x64(True):
        state = BCOState(jnp.float32(0.3), jnp.float32(4.0))
        w = np.linspace(0.5, 2.0, 6)
        f = lambda lp, rp: bco(lp, rp, d["labels"], state, w, update_state=False)[0]
        check_grads(f, (d["logps"], d["ref"]), order=1, modes=["rev"])
        # With the update on, delta is detached: grads equal those with delta held fixed.
        _, new = bco(d["logps"], d["ref"], d["labels"], state)
        lp0 = jnp.asarray(d["logps"])
        g_upd = jax.grad(lambda lp: jnp.sum(bco(lp, d["ref"], d["labels"], state)[0]))(lp0)
        fixed = BCOState(new.mean, new.count)
        g_fix = jax.grad(lambda lp: jnp.sum(bco(lp, d["ref"], d["labels"], fixed, update_state=False)[0]))(
            jnp.asarray(d["logps"])
        )
        np.testing.assert_allclose(g_upd, g_fix, rtol=1e-6)


def test_bco_extreme_and_registry(data):
    d = data
    losses, state = bco(jnp.full((6,), -1e4, jnp.bfloat16), jnp.zeros(6, jnp.bfloat16), d["labels"],
                        bco.init_state())
    assert np.all(np.isfinite(losses)) and np.isfinite(float(state.mean))
    spec = registry.spec("bco")
    assert spec.stateful and spec.required == ("logps", "ref_logps", "labels", "state")
    assert spec.fn.init_state() == BCOState.initial()
    assert registry.spec("kto").required == ("logps", "ref_logps", "labels", "kl_logps", "ref_kl_logps")


def test_batch_statistics_on_8_device_mesh():
    """z0 and delta are batch-level means: on a data-sharded batch they must equal single-device values."""
    mesh = jax.make_mesh((8,), ("data",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    rng = np.random.default_rng(5)
    lp, rp, kl, rkl = (jnp.asarray(rng.normal(-10, 3, 8), jnp.float32) for _ in range(4))
    labels = jnp.asarray(rng.uniform(size=8) > 0.5)
    put = lambda x: jax.device_put(x, shard)
    kto_j = jax.jit(kto)
    sharded = kto_j(*map(put, (lp, rp, labels, kl, rkl)))
    np.testing.assert_allclose(sharded, kto(lp, rp, labels, kl, rkl), rtol=1e-6)
    bco_j = jax.jit(bco)
    got, s_got = bco_j(put(lp), put(rp), put(labels), bco.init_state())
    want, s_want = bco(lp, rp, labels, bco.init_state())
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(s_got.mean, s_want.mean, rtol=1e-6)
