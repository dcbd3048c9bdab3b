"""The LoRA train step: adapters only are differentiated, the reference is the base (no copy), the
gradient is the chain rule of full fine-tuning's, and the step is the same on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alignjax import logprobs, sharding
from alignjax.models import PRESETS, Model, lora
from alignjax.models.config import LoraConfig
from alignjax.sharding import global_batch
from alignjax.train import step as steplib
from tests.train.conftest import SMALL, stack


def _config():
    return ml_collections.ConfigDict(
        dict(
            loss=dict(name="sigmoid", nll_weight=0.0, beta=0.5),
            data=dict(kind="pairwise"),
            train=dict(nan_at_step=-1),
        )
    )


def _model(mesh=None, **lora_kw):
    scan = lora_kw.pop("scan", False)
    remat = lora_kw.pop("remat", "none")
    cfg = PRESETS["tiny"].replace(**SMALL, scan_layers=scan, remat=remat)
    if lora_kw.get("rank", 4):
        cfg = cfg.replace(lora=LoraConfig(**{"rank": 4, **lora_kw}))
    return Model(cfg, mesh=mesh)


def _trained_b(model, params, scale=0.2):
    """Non-zero B (a policy away from its reference), equal on every mesh."""
    host = jax.device_get(params)
    keys = iter(range(1000))
    host = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            np.random.default_rng(next(keys)).normal(0, scale, x.shape).astype(x.dtype)
            if p[-1].key == "lora_b"
            else x
        ),
        host,
    )
    return jax.device_put(host, model.shardings()) if model.mesh is not None else host


def _one_step(model, params, batches, k, mesh):
    spec = steplib.make_step_spec(_config(), 8 // k, "model")
    tx = optax.adam(1e-2)
    step = jax.jit(
        steplib.make_train_step(model, spec, tx, optax.constant_schedule(1e-2)),
        compiler_options=logprobs.STRICT_ROUNDING,
    )
    # No "ref_params": with LoRA the reference is the policy's base, adapters off.
    state = {
        "params": params,
        "opt_state": tx.init(lora.trainable_part(params)),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(0),
    }
    return step(state, global_batch(mesh, stack(batches), stacked=True))


@pytest.mark.parametrize(
    "setting",
    [dict(k=1), dict(k=2, scan=True, remat="full"), dict(k=2, scan=True, quantize="nf4")],
    ids=["unrolled", "scanned-remat-accum", "qlora-nf4"],
)
def test_lora_dpo_step_on_eight_devices_equals_one_device(pair_batches, setting):
    setting = dict(setting)
    k = setting.pop("k")
    one = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    eight = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    results = []
    for mesh, micro in ((one, 1), (eight, k)):  # and 1 vs k micro-batches
        model = _model(mesh, **setting)
        params = _trained_b(model, model.init(jax.random.PRNGKey(1)))
        batches = pair_batches[8] if micro == 1 else pair_batches[4]
        state, metrics = _one_step(model, params, batches, micro, mesh)
        assert "ref_params" not in state
        # Adam's moments exist for the adapters only.
        moments = optax.tree_utils.tree_get(state["opt_state"], "mu")
        assert {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(moments)} == {"lora_a", "lora_b"}
        for new, old in zip(
            jax.tree.leaves(lora.strip_adapters(state["params"])),
            jax.tree.leaves(lora.strip_adapters(params)),
        ):
            np.testing.assert_array_equal(new, old)  # the frozen base never moves
        results.append((jax.device_get(metrics), jax.device_get(state["params"])))
    (m1, p1), (m8, p8) = results
    assert 0.05 < float(m1["loss"]) and abs(float(m1["loss"]) - np.log(2)) > 1e-3  # policy != reference
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(lora.trainable_part(p1)), jax.tree.leaves(lora.trainable_part(p8))):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_adapter_gradient_is_the_chain_rule_of_the_full_fine_tuning_gradient(pair_batches):
    """At B = 0: dL/dA = 0 and dL/dB = s A^T dL/dW, dL/dW being full fine-tuning's gradient
    (the plain decoder, no LoRA code involved)."""
    adapted = _model(rank=4, alpha=12.0)
    full = _model(rank=0)
    params = adapted.init(jax.random.PRNGKey(2))
    base = lora.strip_adapters(params)
    spec = steplib.make_step_spec(_config(), 8, "model")
    batch = {k: jnp.asarray(v) for k, v in pair_batches[8][0].items()}
    trainable, frozen = lora.partition(params)
    loss_fn = steplib.make_loss_fn(adapted, spec)
    lora_grads = jax.grad(lambda t: loss_fn(lora.combine(t, frozen), None, None, batch)[0])(trainable)
    full_grads = jax.grad(lambda p: steplib.make_loss_fn(full, spec)(p, base, None, batch)[0])(base)
    s = 12.0 / 4
    for parent, name in (("self_attn", "q_proj"), ("self_attn", "o_proj"), ("mlp", "down_proj")):
        got = lora_grads["layers_0"][parent][name]
        w_grad = np.asarray(full_grads["layers_0"][parent][name]["kernel"])
        a = np.asarray(params["layers_0"][parent][name]["lora_a"])
        n_in = a.ndim - 1
        expect = s * np.tensordot(a, w_grad, axes=(tuple(range(n_in)), tuple(range(n_in))))
        assert np.abs(expect).max() > 1e-4
        np.testing.assert_allclose(got["lora_b"], expect, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(got["lora_a"], np.zeros_like(a))
