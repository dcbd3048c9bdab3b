"""``ModelConfig.scan_layers``: the scanned decoder against the unrolled one (values, gradients, KV-cache
decoding, optimiser), HF import into the stacked layout against `transformers`, export round trip,
orbax checkpoints of the stacked layout (fp32, CPU, 8-device mesh)."""

import dataclasses
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.models import Model, ModelConfig, from_pretrained, save_pretrained
from alignjax.models.transformer import stack_layers, unstack_layers
from alignjax.sharding import make_mesh
from alignjax.train import checkpoint as ckpt
from alignjax.train.optim import decay_mask, make_optimizer

# Biases, q/k norms and a sliding window: every kind of layer leaf, and every mask rule.
CONFIG = ModelConfig(
    model_type="qwen3",
    vocab_size=64,
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    attention_bias=True,
    attention_out_bias=True,
    qk_norm=True,
    sliding_window=5,
)
L = CONFIG.num_layers


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def unrolled(mesh):
    model = Model(CONFIG, mesh=mesh)
    # Random norms and biases, so a leaf read from the wrong layer or slot cannot go unnoticed.
    params = model.init(jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, params


def scanned_model(mesh, **changes):
    return Model(CONFIG.replace(scan_layers=True, **changes), mesh=mesh)


def batch():
    """Two packed rows with a shared-prompt branch layout in the second (all of the mask's rules)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size, (2, 12)).astype(np.int32)
    seg = np.array([[1] * 7 + [2] * 4 + [0], [1] * 12], np.int32)
    pos = np.array([list(range(7)) + list(range(4)) + [0], list(range(12))], np.int32)
    branch = np.array([[0] * 12, [0] * 4 + [1] * 4 + [2] * 4], np.int32)
    return dict(input_ids=ids, segment_ids=seg, positions=pos, branch_ids=branch)


def loss(model, params, b):
    logits = model.apply(
        params,
        b["input_ids"],
        positions=b["positions"],
        segment_ids=b["segment_ids"],
        branch_ids=b["branch_ids"],
    )
    logp = jax.nn.log_softmax(logits, axis=-1)
    targets = jnp.roll(b["input_ids"], -1, axis=1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits


def test_stacked_layout_and_shardings(mesh, unrolled):
    model = scanned_model(mesh)
    abstract = model.abstract_params()
    stacked = stack_layers(unrolled[1], L)
    assert jax.tree.structure(abstract) == jax.tree.structure(stacked)
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, stacked)
    assert model.logical_axes["layers"]["self_attn"]["q_proj"]["kernel"] == (
        "layers",
        "embed",
        "heads",
        "head_dim",
    )
    params = model.init(jax.random.PRNGKey(0))
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (L, 32, 4, 8)
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)  # the layer axis replicated
    # One rng per layer at init: the layers differ.
    assert not np.allclose(np.asarray(q[0]), np.asarray(q[1]))
    back = unstack_layers(stacked, L)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, unrolled[1])


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_values_and_gradients_equal_unrolled(mesh, unrolled, remat):
    model, params = unrolled
    scanned = scanned_model(mesh, remat=remat)
    b = batch()
    grad = lambda m: jax.jit(jax.value_and_grad(lambda p: loss(m, p, b), has_aux=True))
    (l_u, logits_u), g_u = grad(model)(params)
    (l_s, logits_s), g_s = grad(scanned)(stack_layers(params, L))
    valid = b["segment_ids"] > 0
    np.testing.assert_allclose(np.asarray(logits_s)[valid], np.asarray(logits_u)[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(l_s), float(l_u), rtol=1e-6)
    g_u = stack_layers(g_u, L)
    for (path, a), b_ in zip(jax.tree_util.tree_leaves_with_path(g_s), jax.tree.leaves(g_u)):
        a, b_ = np.asarray(a), np.asarray(b_)
        assert np.abs(b_).max() > 0, path
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-6 * np.abs(b_).max(), err_msg=str(path))


def test_kv_cache_greedy_decoding_equal(mesh, unrolled):
    from alignjax.search.generate import Generator

    model, params = unrolled
    scanned = scanned_model(mesh)
    cache = scanned.init_cache(2, 16)
    assert cache["layers"]["k"].shape == (L, 2, 16, 2, 8)
    prompts = [[3, 9, 4, 1, 7], [5, 2]]
    runs = [
        Generator(m, min_prompt_bucket=8).generate(
            p, prompts, jax.random.PRNGKey(0), num_samples=2, max_new_tokens=6, greedy=True
        )
        for m, p in ((model, params), (scanned, stack_layers(params, L)))
    ]
    np.testing.assert_array_equal(runs[1].tokens, runs[0].tokens)
    np.testing.assert_array_equal(runs[1].lengths, runs[0].lengths)
    np.testing.assert_allclose(runs[1].logps, runs[0].logps, atol=1e-5)
    # The two samples of a prompt share its prefill: the repeated cache rows are that prompt's.
    np.testing.assert_array_equal(runs[1].tokens[:, 0], runs[1].tokens[:, 1])


def test_decode_cache_is_the_stacked_unrolled_cache(mesh, unrolled):
    model, params = unrolled
    scanned = scanned_model(mesh)
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
    pos = np.tile(np.arange(4, dtype=np.int32), (2, 1))
    lu, cu = jax.jit(model.decode)(params, ids, model.init_cache(2, 8), positions=pos)
    ls, cs = jax.jit(scanned.decode)(stack_layers(params, L), ids, scanned.init_cache(2, 8), positions=pos)
    np.testing.assert_allclose(np.asarray(ls), np.asarray(lu), atol=1e-5)
    for a, b_ in zip(jax.tree.leaves(unstack_layers(cs, L)), jax.tree.leaves(cu)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-6)


def test_optimizer_decay_mask_and_update_equal(mesh, unrolled):
    model, params = unrolled
    stacked = stack_layers(params, L)
    mask_u, mask_s = decay_mask(params), decay_mask(stacked)
    assert mask_s["layers"]["self_attn"]["q_proj"] == {"kernel": True, "bias": False}
    assert mask_s["layers"]["self_attn"]["q_norm"]["scale"] is False
    assert mask_s["layers"]["input_layernorm"]["scale"] is False
    for i in range(L):
        assert mask_s["layers"] == mask_u[f"layers_{i}"]
    optim = types.SimpleNamespace(
        name="adamw",
        learning_rate=1e-2,
        warmup_steps=0,
        end_learning_rate_factor=0.0,
        schedule="constant",
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.5,
        grad_clip_norm=1.0,
    )
    tx, _ = make_optimizer(optim, 10)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)

    @jax.jit
    def update(p, g):
        u, _ = tx.update(g, tx.init(p), p)
        return jax.tree.map(lambda a, b: a + b, p, u)

    new_u = stack_layers(update(params, grads), L)
    new_s = update(stacked, stack_layers(grads, L))
    for a, b_ in zip(jax.tree.leaves(new_s), jax.tree.leaves(new_u)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("torch")
    from tests.hf_fixtures import save_llama

    path = str(tmp_path_factory.mktemp("llama"))
    save_llama(path, vocab_size=96, seed=3)
    return path


def test_hf_import_into_scanned_model_matches_transformers(mesh, hf_dir):
    import torch
    import transformers

    scanned = from_pretrained(hf_dir, scan_layers=True, mesh=mesh)
    assert scanned.config.scan_layers and "layers_0" not in scanned.params
    q = scanned.params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None)
    unrolled = from_pretrained(hf_dir, mesh=mesh)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        scanned.params,
        stack_layers(unrolled.params, unrolled.config.num_layers),
    )
    ids = np.random.default_rng(0).integers(0, 96, (2, 10))
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jax.jit(scanned.apply)(scanned.params, ids)), ref, atol=1e-4)


def test_export_round_trip(mesh, hf_dir, tmp_path):
    from safetensors.numpy import load_file

    scanned = from_pretrained(hf_dir, scan_layers=True, mesh=mesh)
    save_pretrained(scanned, scanned.params, tmp_path)
    original, exported = (load_file(os.path.join(d, "model.safetensors")) for d in (hf_dir, tmp_path))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    again = from_pretrained(str(tmp_path), scan_layers=True, mesh=mesh)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again.params, scanned.params
    )


def test_orbax_checkpoint_of_the_stacked_layout(mesh, unrolled, tmp_path):
    model, params = unrolled
    scanned = scanned_model(mesh)
    state = {"params": stack_layers(params, L)}
    abstract = jax.eval_shape(lambda: state)
    manifest = ckpt.shape_manifest(abstract, dataclasses.asdict(scanned.config))
    checkpointer = ckpt.Checkpointer(tmp_path / "checkpoints", async_save=False)
    checkpointer.save(1, state, {}, manifest)
    target = ckpt.abstract_with_shardings(abstract, {"params": scanned.shardings()})
    step, restored, _ = checkpointer.restore_latest(target, manifest)
    assert step == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)
    # Resuming it with the other layout: refused, naming scan_layers, before any array is read.
    other = {"params": model.abstract_params()}
    other_manifest = ckpt.shape_manifest(other, dataclasses.asdict(model.config))
    with pytest.raises(ckpt.CheckpointMismatch, match=r"'scan_layers': \(True, False\)"):
        checkpointer.restore_latest(other, other_manifest)
    checkpointer.close()


def test_train_run_saved_scanned_resumes_scanned_and_refuses_the_other_layout(tmp_path):
    import json

    from alignjax.main import load_config_file
    from alignjax.train.loop import run_train

    def config(steps, scan):
        c = load_config_file(f"experiments/dpo.py:runlocal,steps={steps}")
        c.model.overrides.update(
            dict(
                vocab_size=16, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64
            )
        )
        c.model.scan_layers = scan
        c.data.max_length, c.data.num_eval = 10, 0
        c.train.update(dict(checkpoint_every=2, progress=False, tensorboard=False, plot=False))
        return c

    run_train(config(2, True), str(tmp_path))
    manifest = json.loads((tmp_path / "checkpoints" / "2" / "manifest" / "metadata").read_text())
    assert manifest["model_config"]["scan_layers"] is True
    assert any(k.startswith("['layers']") for k in manifest["param_shapes"])
    run_train(config(3, True), str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f if '"loss"' in line] == [1, 2, 3]
    with pytest.raises(
        ckpt.CheckpointMismatch,
        match=r"'scan_layers': \(True, False\).*written with \(--config.model.scan_layers=True\)",
    ):
        run_train(config(4, False), str(tmp_path))
