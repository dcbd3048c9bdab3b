"""The FLOP accounting behind MFU and the loop's perf/* metrics, against independent counts: the
model's own attention mask, summed by brute force, and the sizes of real initialised parameters."""

import jax
import numpy as np
import pytest

from alignjax import flops
from alignjax.models import PRESETS, Model
from alignjax.models.transformer import attention_mask


def _brute_force_pairs(seg, branch):
    index = np.broadcast_to(np.arange(seg.shape[1]), seg.shape)
    branch = np.zeros_like(seg) if branch is None else branch
    return int(np.asarray(attention_mask(index, index, seg, seg, branch, branch, index, index, None)).sum())


def test_attention_pairs_closed_form_equals_the_model_mask():
    rng = np.random.default_rng(0)
    for trial in range(20):
        rows, t = 3, 24
        seg = np.zeros((rows, t), np.int32)
        branch = np.zeros((rows, t), np.int32)
        for r in range(rows):  # packed segments, each a prompt then 0-2 branches, then padding
            pos, s = 0, 1
            while pos < t - 3 and rng.random() < 0.8:
                prompt = int(rng.integers(1, 5))
                parts = [prompt] + [int(rng.integers(1, 5)) for _ in range(int(rng.integers(0, 3)))]
                for b, n in enumerate(parts):
                    n = min(n, t - pos)
                    seg[r, pos : pos + n], branch[r, pos : pos + n] = s, b
                    pos += n
                s += 1
        with_branches = {"segment_ids": seg, "branch_ids": branch}
        assert flops.attention_pairs(with_branches) == _brute_force_pairs(seg, branch), trial
        assert flops.attention_pairs({"segment_ids": seg}) == _brute_force_pairs(seg, None), trial


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # untied lm_head
        {"tie_word_embeddings": True},
        {"attention_bias": True, "attention_out_bias": True, "qk_norm": True},
        {"lora": {"rank": 4, "targets": ("q_proj", "o_proj", "mlp/*")}},
    ],
)
def test_param_counts_equal_the_initialised_model(overrides):
    config = PRESETS["tiny"].replace(**overrides)
    params = Model(config).init(jax.random.PRNGKey(0))
    sizes = {
        "/".join(str(getattr(k, "key", k)) for k in path): x.size
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    counts = flops.param_counts(config)
    assert counts["total"] == sum(sizes.values())
    adapters = sum(v for k, v in sizes.items() if k.endswith(("lora_a", "lora_b")))
    assert counts["adapters"] == adapters and (adapters > 0) == ("lora" in overrides)
    assert counts["non_embedding"] == sum(
        v
        for k, v in sizes.items()
        if k not in ("embedding", "lm_head") and not k.endswith(("lora_a", "lora_b"))
    )
    assert counts["N"] == counts["non_embedding"] + config.hidden_size * config.vocab_size


def test_step_flops_policy_reference_and_head():
    config = PRESETS["tiny"]
    seg = np.array([[1] * 10 + [0] * 6, [1] * 7 + [2] * 9], np.int32)
    batch = {"segment_ids": seg}
    counts, tokens = flops.param_counts(config), 26
    pairs = 10 * 11 // 2 + 7 * 8 // 2 + 9 * 10 // 2
    attn = 4 * config.num_heads * config.head_dim * config.num_layers * pairs
    with_ref = flops.step_flops(config, batch, reference_forward=True)
    assert with_ref["row_tokens"] == tokens and flops.attention_pairs(batch) == pairs
    assert with_ref["policy"] == 6 * counts["N"] * tokens + 3 * attn
    assert with_ref["reference"] == 2 * counts["N"] * tokens + attn
    head_free = flops.step_flops(config, batch, reference_forward=False, lm_head=False)
    assert head_free["total"] == 6 * counts["non_embedding"] * tokens + 3 * attn
    adapted = config.replace(lora={"rank": 8})  # no weight gradient of the frozen base
    a = flops.param_counts(adapted)["adapters"]
    lora_step = flops.step_flops(adapted, batch, reference_forward=True)
    assert lora_step["policy"] == (4 * counts["N"] + 6 * a) * tokens + 3 * attn
    assert lora_step["reference"] == with_ref["reference"]


def test_peak_by_device_kind():
    assert flops.peak_flops_per_device("NVIDIA H200") == pytest.approx(989.4e12)
    assert flops.peak_flops_per_device("TPU v5 lite") == pytest.approx(197e12)
    assert flops.peak_flops_per_device("cpu") is None
