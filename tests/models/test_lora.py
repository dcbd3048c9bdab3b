"""LoRA / QLoRA on the decoder: exactly the base model's log-probs at B = 0, the merged HF export
and PEFT's adapter format loaded by transformers + peft, and the quantizers' definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax import logprobs
from alignjax.models import from_pretrained, lora, save_pretrained
from alignjax.models.config import LoraConfig
from alignjax.sharding import make_mesh
from tests.hf_fixtures import save_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
V = 128


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lora_base"))
    save_llama(path, vocab_size=V, seed=3)
    return path


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _ids(rows=4, length=12, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (rows, length), 0, V)


def _token_logps(model, params, ids):
    fn = jax.jit(
        lambda p, x: logprobs.next_token_logps(model.apply(p, x), x),
        compiler_options=logprobs.STRICT_ROUNDING,
    )
    return np.asarray(fn(params, ids))


def _random_b(params, scale=0.05):
    """Non-zero B (a trained adapter), one seed per leaf."""
    counter = iter(range(10_000))

    def leaf(path, x):
        if path[-1].key != "lora_b":
            return x
        noise = jax.random.normal(jax.random.PRNGKey(next(counter)), x.shape, x.dtype) * scale
        return jax.device_put(noise, x.sharding)

    return jax.tree_util.tree_map_with_path(leaf, params)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_zero_b_gives_exactly_the_base_log_probs_and_adapters_shard(hf_dir, mesh, scan):
    base = from_pretrained(hf_dir, mesh=mesh, scan_layers=scan)
    adapted = from_pretrained(hf_dir, mesh=mesh, scan_layers=scan, lora=LoraConfig(rank=4))
    ids = _ids()
    np.testing.assert_array_equal(
        _token_logps(adapted, adapted.params, ids), _token_logps(base, base.params, ids)
    )
    # The reference forward: the same params with the adapters removed is the base model.
    stripped = lora.strip_adapters(adapted.params)
    assert jax.tree.structure(stripped) == jax.tree.structure(base.params)
    layer = adapted.params["layers" if scan else "layers_0"]
    q = layer["self_attn"]["q_proj"]
    assert float(jnp.abs(q["lora_a"]).max()) > 0 and float(jnp.abs(q["lora_b"]).max()) == 0.0
    lead = (None,) if scan else ()
    assert q["lora_a"].sharding.spec == jax.sharding.PartitionSpec(*lead, "fsdp", None)  # embed, lora_rank
    assert q["lora_b"].sharding.spec == jax.sharding.PartitionSpec(
        *lead, None, "tensor", None
    )  # rank, heads, head_dim
    down = layer["mlp"]["down_proj"]["lora_a"]
    assert down.sharding.spec == jax.sharding.PartitionSpec(*lead, "tensor", None)  # mlp, lora_rank


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_merged_export_and_peft_adapter_reproduce_the_adapted_logits(hf_dir, mesh, tmp_path, scan):
    peft = pytest.importorskip("peft")
    targets = ("q_proj", "v_proj", "o_proj", "down_proj") if scan else lora.LORA_ALL_LINEAR
    adapted = from_pretrained(
        hf_dir, mesh=mesh, scan_layers=scan, lora=LoraConfig(rank=4, alpha=8.0, targets=targets)
    )
    params = _random_b(adapted.params)
    ids = _ids(2, 10, seed=1)
    ours = np.asarray(jax.jit(adapted.apply)(params, ids))
    base_logits = np.asarray(jax.jit(adapted.apply)(lora.strip_adapters(params), ids))
    assert np.abs(ours - base_logits).max() > 1e-2  # the adapters change the model

    save_pretrained(adapted, params, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32)
    np.testing.assert_allclose(_hf_logits(merged, ids), ours, atol=1e-4)

    assert lora.save_peft(adapted, params, tmp_path / "adapter", base_model=hf_dir) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert sorted(with_adapter.peft_config["default"].target_modules) == sorted(targets)
    np.testing.assert_allclose(_hf_logits(with_adapter, ids), ours, atol=1e-4)
    with with_adapter.disable_adapter():  # peft's own "adapters off" is our reference forward
        np.testing.assert_allclose(_hf_logits(with_adapter, ids), base_logits, atol=1e-4)


def test_int8_and_nf4_quantizers_follow_their_definitions():
    w = jax.random.normal(jax.random.PRNGKey(0), (128, 3, 5)) * 0.05
    w = w.at[5, 1, 2].set(0.9)  # one outlier: its block's scale only
    blocks = np.asarray(w).reshape(2, 64, 15)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    codes, scales = lora.quantize(w, 0, 1, "int8")
    assert codes.dtype == jnp.int8 and codes.shape == (128, 3, 5) and scales.shape == (2, 3, 5)
    deq = np.asarray(lora.dequantize(codes, scales, (128, 3, 5), 1, "int8", jnp.float32)).reshape(2, 64, 15)
    assert np.all(np.abs(deq - blocks) <= absmax / 254 + 1e-7)  # round to nearest of 255 levels
    codes, scales = lora.quantize(w, 0, 1, "nf4")
    assert codes.dtype == jnp.uint8 and codes.shape == (64, 3, 5)  # two 4-bit codes a byte
    deq = np.asarray(lora.dequantize(codes, scales, (128, 3, 5), 1, "nf4", jnp.float32)).reshape(2, 64, 15)
    # QLoRA's NF4: each weight becomes absmax times the nearest of the 16 levels.
    nearest = lora.NF4[np.abs((blocks / absmax)[..., None] - lora.NF4).argmin(-1)]
    np.testing.assert_allclose(deq, nearest * absmax, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_qlora_base_is_quantized_and_zero_b_equals_its_reference(hf_dir, mesh, tmp_path, kind):
    base = from_pretrained(hf_dir, mesh=mesh)
    q = from_pretrained(hf_dir, mesh=mesh, lora=LoraConfig(rank=4, quantize=kind))
    kernel = q.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
    assert q.params["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        "fsdp", "tensor"
    )
    ids = _ids()
    policy = _token_logps(q, q.params, ids)
    np.testing.assert_array_equal(policy, _token_logps(q, lora.strip_adapters(q.params), ids))
    err = np.abs(policy - _token_logps(base, base.params, ids)).max()
    assert err < (0.05 if kind == "int8" else 0.5), err  # close to the float base, not equal
    save_pretrained(q, lora.strip_adapters(q.params), tmp_path / "base")  # the dequantized base alone
    dequantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", torch_dtype=torch.float32
    )
    reference = np.asarray(jax.jit(q.apply)(lora.strip_adapters(q.params), ids))
    np.testing.assert_allclose(_hf_logits(dequantized, ids), reference, atol=1e-4)
    params = _random_b(q.params)
    save_pretrained(q, params, tmp_path / "merged")  # dequantized + merged
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32)
    np.testing.assert_allclose(_hf_logits(merged, ids), np.asarray(jax.jit(q.apply)(params, ids)), atol=1e-4)
