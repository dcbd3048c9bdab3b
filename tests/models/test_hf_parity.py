"""Parity with the `transformers` reference implementation on tiny random checkpoints (fp32, CPU)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.models import ModelConfig, from_pretrained, save_pretrained
from alignjax.sharding import make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

B, T, V = 2, 8, 128
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    initializer_range=0.2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
# name -> (config class, tied, extra config, max_shard_size)
ARCHS = {
    "llama-rope-scaled-bias": (
        "LlamaConfig",
        False,
        dict(
            rope_theta=500000.0,
            attention_bias=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        None,
    ),
    "mistral-window": ("MistralConfig", True, dict(sliding_window=4), None),
    "qwen2-bias-sharded": ("Qwen2Config", True, {}, "20KB"),
    "qwen3-qknorm": ("Qwen3Config", False, {}, None),
    "qwen3-tied": ("Qwen3Config", True, {}, None),
}


def build_hf(name):
    cls, tied, extra, _ = ARCHS[name]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**COMMON, tie_word_embeddings=tied, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: loading bugs would hide
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in pname else 0.0))
    return model.eval()


def hf_logits(model, ids, mask=None, positions=None):
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(mask))
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(positions))
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(ids)), **kwargs).logits.numpy()


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


_LOADED = {}


def load(name, tmp_path_factory):
    """(name, hf model, checkpoint dir, our Model, jitted apply), built once per architecture."""
    if name not in _LOADED:
        hf = build_hf(name)
        path = tmp_path_factory.mktemp(name)
        shard = ARCHS[name][3]
        hf.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
        if shard:
            assert os.path.exists(path / "model.safetensors.index.json")
        model = from_pretrained(str(path))
        apply = jax.jit(lambda p, ids, pos, seg: model.apply(p, ids, positions=pos, segment_ids=seg))
        _LOADED[name] = (name, hf, path, model, apply)
    return _LOADED[name]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    return load(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen2_sharded(tmp_path_factory):
    return load("qwen2-bias-sharded", tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return load("qwen3-qknorm", tmp_path_factory)


def batch(seed, left):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    lengths = np.array([T, T - 3])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    if left:
        mask = mask[:, ::-1].copy()
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return ids, mask, positions


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_logprobs_match_transformers(checkpoint, left):
    name, hf, _, model, apply = checkpoint
    ids, mask, positions = batch(1, left)
    ours = np.asarray(apply(model.params, ids, positions, mask))
    ref = hf_logits(hf, ids, mask, positions)
    valid = mask.astype(bool)
    # Full log-softmax agreement implies per-token log-prob agreement for any targets.
    np.testing.assert_allclose(log_softmax(ours)[valid], log_softmax(ref)[valid], atol=1e-4, rtol=0)
    tok_ours = np.take_along_axis(log_softmax(ours)[:, :-1], ids[:, 1:, None], -1)[..., 0]
    tok_ref = np.take_along_axis(log_softmax(ref)[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(tok_ours[valid[:, 1:]], tok_ref[valid[:, 1:]], atol=1e-4, rtol=0)


def test_config_mapping(checkpoint):
    name, hf, path, model, _ = checkpoint
    cfg = model.config
    assert cfg.tie_word_embeddings == ARCHS[name][1]
    assert cfg.qk_norm == name.startswith("qwen3")
    assert cfg.attention_bias == (name.startswith("qwen2") or name.startswith("llama"))
    assert cfg.attention_out_bias == name.startswith("llama")
    assert cfg.sliding_window == (4 if name.startswith("mistral") else None)
    assert (cfg.rope_scaling is not None) == name.startswith("llama")
    assert ("lm_head" in model.params) != cfg.tie_word_embeddings


def test_export_roundtrip_loads_in_transformers(checkpoint, tmp_path):
    name, hf, _, model, apply = checkpoint
    save_pretrained(model, model.params, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    ids, mask, positions = batch(2, False)
    np.testing.assert_allclose(hf_logits(reloaded.eval(), ids), hf_logits(hf, ids), atol=1e-5, rtol=0)
    again = from_pretrained(str(tmp_path))
    assert again.config == model.config
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again.params, model.params
    )


def test_hidden_times_unembedding_is_logits(checkpoint):
    _, _, _, model, apply = checkpoint
    ids, mask, positions = batch(3, False)
    hidden = jax.jit(lambda p: model.hidden(p, ids, positions=positions, segment_ids=mask))(model.params)
    logits = np.asarray(hidden) @ np.asarray(model.unembedding(model.params))
    np.testing.assert_allclose(logits, np.asarray(apply(model.params, ids, positions, mask)), atol=1e-5)


def test_sharded_load_on_2x2x2_mesh_matches_one_device(qwen2_sharded):
    name, _, path, model, apply = qwen2_sharded
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = from_pretrained(str(path), mesh=mesh)
    q = sharded.params["layers_0"]["self_attn"]["q_proj"]
    assert q["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert q["bias"].sharding.spec == jax.sharding.PartitionSpec("tensor", None)
    assert sharded.params["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert sharded.params["layers_1"]["mlp"]["down_proj"][
        "kernel"
    ].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    expected = sharded.shardings()
    jax.tree.map(
        lambda x, s: (x.sharding.is_equivalent_to(s, x.ndim)) or pytest.fail(f"{x.sharding} != {s}"),
        sharded.params,
        expected,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded.params, model.params
    )
    rng = np.random.default_rng(4)
    ids = rng.integers(0, V, (4, T)).astype(np.int32)
    mesh_logits = jax.jit(lambda p, x: sharded.apply(p, x))(sharded.params, ids)
    assert mesh_logits.sharding.spec[0] == ("data", "fsdp")
    one = jax.jit(lambda p, x: model.apply(p, x))(model.params, ids)
    np.testing.assert_allclose(np.asarray(mesh_logits), np.asarray(one), atol=1e-5, rtol=0)


def write_config(path, **changes):
    with open(path / "config.json") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f)


def test_error_unknown_model_type(qwen3, tmp_path):
    name, _, path, _, _ = qwen3
    import shutil

    shutil.copytree(path, tmp_path / "ckpt")
    write_config(tmp_path / "ckpt", model_type="gpt2")
    with pytest.raises(ValueError) as e:
        from_pretrained(str(tmp_path / "ckpt"))
    msg = str(e.value)
    assert (
        "gpt2" in msg and "config.json" in msg and str(tmp_path) in msg and "qwen3" in msg and "llama" in msg
    )


def test_error_wrong_shape_and_missing_tensor(qwen3, tmp_path):
    name, _, path, _, _ = qwen3
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(path, tmp_path / "shape")
    write_config(tmp_path / "shape", intermediate_size=48)
    with pytest.raises(ValueError) as e:
        from_pretrained(str(tmp_path / "shape"))
    msg = str(e.value)
    assert "model.layers.0.mlp.gate_proj.weight" in msg and "(64, 32)" in msg and "(48, 32)" in msg
    assert "model.safetensors" in msg

    shutil.copytree(path, tmp_path / "missing")
    tensors = load_file(str(tmp_path / "missing" / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(tmp_path / "missing" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        from_pretrained(str(tmp_path / "missing"))
    msg = str(e.value)
    assert "model.layers.1.self_attn.k_norm.weight" in msg and "model.safetensors" in msg and "missing" in msg

    with pytest.raises(FileNotFoundError, match="neither a preset"):
        from_pretrained(str(tmp_path / "nowhere"))


def test_from_hf_unknown_model_type_names_source():
    with pytest.raises(ValueError, match=r"x/config.json: model_type='bert'.*llama.*mistral.*qwen2.*qwen3"):
        ModelConfig.from_hf({"model_type": "bert"}, source="x/config.json")
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        ModelConfig.from_hf(
            {
                "model_type": "llama",
                "vocab_size": 8,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 8,
                "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
            },
            source="c.json",
        )


def test_bf16_export_dtype(tmp_path):
    from safetensors import safe_open

    model = from_pretrained("tiny", dtype="bfloat16")
    assert model.params["embedding"].dtype == jnp.bfloat16
    save_pretrained(model, model.params, str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    again = from_pretrained(str(tmp_path), dtype="bfloat16")
    np.testing.assert_array_equal(
        np.asarray(again.params["lm_head"], np.float32), np.asarray(model.params["lm_head"], np.float32)
    )
