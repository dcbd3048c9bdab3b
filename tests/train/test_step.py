"""The train step: loss inputs from the registry spec, gradient accumulation, EMA, mesh invariance."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alignjax import sharding
from alignjax.sharding import global_batch
from alignjax.train import step as steplib
from tests.train.conftest import small_model, stack


def _config(loss="sigmoid", kind="pairwise", **hyper):
    return ml_collections.ConfigDict(
        dict(loss=dict(name=loss, nll_weight=0.0, **hyper), data=dict(kind=kind), train=dict(nan_at_step=-1))
    )


def _np_seq_logps(logits, batch, n):
    """Independent NumPy: log-softmax, shifted gather, masked segment sums."""
    logits = np.asarray(logits, np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    ids = batch["input_ids"]
    out = np.zeros(n)
    for r in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            e = batch["example_ids"][r, t]
            if e >= 0:
                out[e] += batch["loss_mask"][r, t] * logp[r, t - 1, ids[r, t]]
    return out


@pytest.fixture(scope="module")
def model_params():
    model = small_model()
    return model, model.init(jax.random.PRNGKey(1))


def test_loss_inputs_and_dpo_at_reference_is_log2(model_params, pair_batches):
    model, params = model_params
    host = pair_batches[8][0]
    spec = steplib.make_step_spec(_config(beta=0.5), 8, "model")
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    loss, (metrics, _) = jax.jit(steplib.make_loss_fn(model, spec))(params, params, None, batch)
    seq = _np_seq_logps(model.apply(params, batch["input_ids"]), host, 16)
    np.testing.assert_allclose(metrics["logps/chosen"], seq[:8].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["logps/rejected"], seq[8:].mean(), rtol=1e-5)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)  # policy == reference
    assert float(metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)
    lengths = host["loss_mask"].sum(1)
    np.testing.assert_allclose(metrics["nll/chosen"], np.mean(-seq[:8] / lengths[:8]), rtol=1e-5)


def test_sft_loss_is_mean_token_nll_and_reference_free(model_params):
    from tests.train.conftest import host_batches

    model, params = model_params
    host = host_batches(4, 1, kind="sft", source="synthetic:arithmetic_sft:train")[0]
    spec = steplib.make_step_spec(_config("sft", kind="sft"), 4, "model")
    assert spec.reference == "none"  # the sft loss needs no ref_* input: no reference forward
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    loss, _ = steplib.make_loss_fn(model, spec)(params, None, None, batch)
    seq = _np_seq_logps(model.apply(params, batch["input_ids"]), host, 4)
    np.testing.assert_allclose(loss, np.mean(-seq / host["lengths"]), rtol=1e-5)
    with pytest.raises(ValueError, match="needs reference log-probs.*kind='none'"):
        steplib.make_step_spec(_config("sigmoid"), 4, "none")
    with pytest.raises(ValueError, match=r"config.loss.gamma: loss 'sigmoid' has no hyperparameter 'gamma'"):
        steplib.make_step_spec(_config("sigmoid", gamma=1.0), 4, "model")


def _one_update(model, params, batches, k, mesh, sync_every=0, alpha=1.0, steps=1):
    spec = steplib.make_step_spec(_config(beta=0.5), 8 // k, "model")
    tx = optax.sgd(1.0)
    step = jax.jit(
        steplib.make_train_step(
            model, spec, tx, optax.constant_schedule(1.0), sync_every=sync_every, sync_alpha=alpha
        )
    )
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(0),
        "ref_params": jax.tree.map(lambda x: x + 0.01, params),
    }
    out = []
    for _ in range(steps):
        state, metrics = step(state, global_batch(mesh, stack(batches), stacked=True))
        out.append((state, metrics))
    return out


def test_grad_accumulation_equals_full_batch(model_params, pair_batches):
    model, params = model_params
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    ((full, m_full),) = _one_update(model, params, pair_batches[8], 1, mesh)
    ((acc, m_acc),) = _one_update(model, params, pair_batches[4], 2, mesh)
    np.testing.assert_allclose(m_full["loss"], m_acc["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(acc["params"])):
        np.testing.assert_allclose(a, b, atol=2e-6)
    assert float(m_full["grad_norm"]) > 0


def test_ema_sync_every_tau_steps(model_params, pair_batches):
    model, params = model_params
    mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    ref0 = jax.tree.map(lambda x: x + 0.01, params)
    (s1, _), (s2, _) = _one_update(model, params, pair_batches[8], 1, mesh, sync_every=2, alpha=0.25, steps=2)
    for r0, r1 in zip(jax.tree.leaves(ref0), jax.tree.leaves(s1["ref_params"])):
        np.testing.assert_array_equal(r0, r1)  # step 1: no sync
    for r0, p2, r2 in zip(
        jax.tree.leaves(ref0), jax.tree.leaves(s2["params"]), jax.tree.leaves(s2["ref_params"])
    ):
        np.testing.assert_allclose(r2, 0.25 * np.asarray(p2) + 0.75 * np.asarray(r0), atol=1e-6)


def test_eight_device_mesh_equals_single_device(pair_batches):
    one = sharding.make_mesh({"data": -1}, jax.devices()[:1])
    eight = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    results = []
    for mesh in (one, eight):
        model = small_model(mesh)
        params = model.init(jax.random.PRNGKey(1))
        ((state, metrics),) = _one_update(model, params, pair_batches[8], 1, mesh)
        results.append((float(metrics["loss"]), jax.device_get(state["params"])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_kto_kl_sequences_pair_each_prompt_with_the_next_completion(model_params):
    """Unpaired batches carry KTO's mismatched sequences; the step feeds them to the KL estimate."""
    model, params = model_params
    records = [
        {"prompt": f"{a:02d}+{b:02d}=", "completion": c, "label": bool(i % 2)}
        for i, (a, b, c) in enumerate([(12, 34, "64"), (58, 67, "521"), (9, 9, "81"), (40, 2, "24")])
    ]
    from alignjax.data import make_preference_batches, synthetic

    data, _ = make_preference_batches(
        records,
        "arithmetic",
        kind="unpaired",
        batch_size=4,
        max_length=10,
        buckets=(10,),
        shuffle=False,
        process_index=0,
        process_count=1,
    )
    host = next(data)
    tok = synthetic.arithmetic_tokenizer()
    for i in range(4):  # sequence 4+i is prompt i followed by completion i+1
        row = host["input_ids"][4 + i][host["segment_ids"][4 + i] > 0].tolist()
        nxt = records[(i + 1) % 4]
        prompt_ids = tok.encode_prompt(records[i]["prompt"])
        assert row == prompt_ids + tok.encode_completion(records[i]["prompt"], nxt["completion"], prompt_ids)
    spec = steplib.make_step_spec(_config(loss="kto", kind="unpaired", beta=0.1), 4, "model")
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    ref_params = jax.tree.map(lambda p: p * 0.9, params)
    policy = jax.jit(lambda p: steplib.logprobs.batch_sequence_logps(model, p, batch, 8))
    loss, _ = jax.jit(steplib.make_loss_fn(model, spec))(params, ref_params, None, batch)
    seq = _np_seq_logps(model.apply(params, batch["input_ids"]), host, 8)
    ref = _np_seq_logps(model.apply(ref_params, batch["input_ids"]), host, 8)
    np.testing.assert_allclose(np.asarray(policy(params)[0]), seq, rtol=1e-5)
    u, kl = seq[:4] - ref[:4], seq[4:] - ref[4:]
    z0 = max(0.0, kl.mean())
    labels = host["label"]
    sig = lambda x: 1 / (1 + np.exp(-x))
    expected = np.where(labels, 1 - sig(0.1 * (u - z0)), 1 - sig(0.1 * (z0 - u))).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2 examples"):
        next(
            make_preference_batches(
                records[:1], "arithmetic", kind="unpaired", batch_size=1, process_index=0, process_count=1
            )[0]
        )


@pytest.fixture(scope="module")
def hf_pairs(tmp_path_factory):
    from tests import hf_fixtures

    root = tmp_path_factory.mktemp("hf_pairs")
    path = hf_fixtures.save_checkpoint(str(root / "ckpt"))
    return path, hf_fixtures.write_pairs(str(root / "pairs.jsonl"), 16)


@pytest.mark.parametrize(
    "layout, compute, cut",
    [("padded", "float32", 0), ("packed", "float32", 0), ("padded", "bfloat16", 0),
     ("padded", "float32", 5), ("padded", "bfloat16", 5)],
)  # fmt: skip
def test_policy_equal_to_reference_gives_bitwise_equal_log_probs(hf_pairs, layout, compute, cut):
    """Policy = reference, CPU fp32 and bf16 compute (YNNPACK's dots), 8-device mesh: the
    differentiated policy forward, the reference forward in the same program and the plain forward
    (the reference cache's and evaluation's program) give bitwise-equal per-sequence log-probs, so
    the real train step's first metrics are DPO at the reference exactly: rewards 0, accuracy 0, loss
    fp32 log 2 (XLA:CPU's default fusions gave 1-ulp differences: rewards/accuracies 0.083 -- see
    logprobs.STRICT_ROUNDING). ``cut``: ``data.max_completion_length``, so the head runs at the
    counted tokens only (``StepSpec.logit_width``)."""
    from alignjax import logprobs
    from alignjax.data import make_preference_batches
    from alignjax.data.batching import counted_width
    from alignjax.models import from_pretrained
    from alignjax.train.optim import make_optimizer
    from alignjax.train.reference import stored_reference

    path, pairs = hf_pairs
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = from_pretrained(path, mesh=mesh, compute_dtype=compute)
    params = model.params
    extra = dict(pack_length=96, pack_rows=16) if layout == "packed" else dict(buckets=(48,))
    data, _ = make_preference_batches(
        pairs, path, kind="pairwise", layout=layout, batch_size=16, max_length=48, seed=0,
        process_index=0, process_count=1, max_completion_length=cut or None, **extra,
    )  # fmt: skip
    host = next(data)
    batch = global_batch(mesh, host)
    n = 32
    step_config = _config(beta=0.1)
    step_config.data.update(layout=layout, max_completion_length=cut)
    spec = steplib.make_step_spec(step_config, 16, "model")
    assert spec.logit_width == counted_width(layout, cut) == (cut or None)

    def forward(p, b):
        return logprobs.batch_sequence_logps(model, p, b, n, logit_width=spec.logit_width)[0]

    def objective(p, r, b):
        policy, ref = forward(p, b), jax.lax.stop_gradient(forward(r, b))
        return jnp.mean(jax.nn.log_sigmoid(0.1 * (policy - ref))), (policy, ref)

    ref_params = stored_reference(params, model.config.dtype)
    options = logprobs.strict_rounding(compute)
    (_, (policy, ref)), _ = jax.jit(jax.value_and_grad(objective, has_aux=True), compiler_options=options)(
        params, ref_params, batch
    )
    plain = jax.jit(forward, compiler_options=options)(ref_params, batch)
    assert np.all(np.asarray(policy) < 0)
    np.testing.assert_array_equal(np.asarray(policy), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(policy), np.asarray(plain))

    config = ml_collections.ConfigDict(
        dict(name="adamw", learning_rate=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.1,
             end_learning_rate_factor=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0)
    )  # fmt: skip
    tx, schedule = make_optimizer(config, 10)
    step = jax.jit(steplib.make_train_step(model, spec, tx, schedule), compiler_options=options)
    state = {
        "params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(0), "ref_params": ref_params,
    }  # fmt: skip
    _, metrics = step(state, global_batch(mesh, stack([host]), stacked=True))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key] == 0.0, key
    assert metrics["loss"] == float(np.float32(np.log(2.0)))
    assert metrics["logps/chosen"] == pytest.approx(float(np.mean(np.asarray(policy)[:16])), rel=1e-6)
