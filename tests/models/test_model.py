"""Decoder behaviour: packing, shared-prompt branches, KV-cache decoding, presets, remat, sharding."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from alignjax.models import PRESETS, Model, ModelConfig, from_pretrained
from alignjax.sharding import make_mesh

CFG = ModelConfig(
    model_type="qwen3",
    vocab_size=128,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    qk_norm=True,
    attention_bias=True,
    tie_word_embeddings=False,
)


def randomise(params, seed=1):
    """Init leaves norms at 1 and biases at 0; perturb every leaf so nothing is invisible."""
    rng = np.random.default_rng(seed)  # NumPy: eager jax.random would compile once per shape
    return jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(np.float32), params)


@pytest.fixture(scope="module")
def model():
    m = Model(CFG)
    m.params = randomise(m.init(jax.random.PRNGKey(0)))
    return m


@pytest.fixture(scope="module")
def forward(model):
    return jax.jit(
        lambda p, ids, pos, seg, br: model.apply(p, ids, positions=pos, segment_ids=seg, branch_ids=br)
    )


def run(model, forward, ids, pos=None, seg=None, br=None):
    ids = np.asarray(ids, np.int32)[None]
    T = ids.shape[1]
    pos = np.arange(T) if pos is None else pos
    seg = np.ones(T) if seg is None else seg
    br = np.zeros(T) if br is None else br
    return np.asarray(forward(model.params, ids, *(np.asarray(a, np.int32)[None] for a in (pos, seg, br))))[0]


def test_segment_packing_equals_separate_runs(model, forward):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 128, 5), rng.integers(0, 128, 3)
    packed = np.concatenate([a, b, [0, 0]])
    pos = np.concatenate([np.arange(5), np.arange(3), [0, 0]])
    seg = np.array([1] * 5 + [2] * 3 + [0, 0])
    out = run(model, forward, packed, pos, seg)
    np.testing.assert_allclose(out[:5], run(model, forward, a), atol=1e-5)
    np.testing.assert_allclose(out[5:8], run(model, forward, b), atol=1e-5)
    assert np.isfinite(out).all()  # fully masked padding rows stay finite


def test_branch_ids_equal_separate_prompt_plus_continuation(model, forward):
    rng = np.random.default_rng(1)
    prompt, chosen, rejected = rng.integers(0, 128, 4), rng.integers(0, 128, 3), rng.integers(0, 128, 2)
    row = np.concatenate([prompt, chosen, rejected])
    pos = np.concatenate([np.arange(4), 4 + np.arange(3), 4 + np.arange(2)])
    br = np.array([0] * 4 + [1] * 3 + [2] * 2)
    out = run(model, forward, row, pos, br=br)
    pc = run(model, forward, np.concatenate([prompt, chosen]))
    pr = run(model, forward, np.concatenate([prompt, rejected]))
    np.testing.assert_allclose(out[:7], pc, atol=1e-5)
    np.testing.assert_allclose(out[7:], pr[4:], atol=1e-5)
    # Without branch ids the rejected tokens would see the chosen ones: the mask matters here.
    assert not np.allclose(run(model, forward, row, pos)[7:], pr[4:], atol=1e-3)


def test_cached_decode_equals_full_forward(model, forward):
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, 128, 9), rng.integers(0, 128, 9)]
    prompt_len = np.array([5, 3])
    S, P = 16, 5
    prompts = np.stack([np.where(np.arange(P) < n, s[:P], 0) for s, n in zip(seqs, prompt_len)]).astype(
        np.int32
    )
    decode = jax.jit(model.decode)
    cache = model.init_cache(2, S)
    assert cache["layers_0"]["k"].shape == (2, S, 2, 8)
    # Prefill: right-padded prompts; pad tokens get positions past their row's length (overwritten later).
    logits, cache = decode(
        model.params, prompts, cache, positions=np.tile(np.arange(P, dtype=np.int32), (2, 1))
    )
    full = [run(model, forward, s) for s in seqs]
    for r in range(2):
        np.testing.assert_allclose(
            np.asarray(logits)[r, : prompt_len[r]], full[r][: prompt_len[r]], atol=1e-5
        )
    for step in range(4):  # one token per row per step, at that row's own position
        pos = prompt_len + step
        toks = np.array([seqs[r][pos[r]] for r in range(2)], np.int32)[:, None]
        logits, cache = decode(model.params, toks, cache, positions=pos[:, None].astype(np.int32))
        for r in range(2):
            np.testing.assert_allclose(np.asarray(logits)[r, 0], full[r][pos[r]], atol=1e-5)


def test_remat_policies_give_same_logits_and_grads(model):
    ids = np.random.default_rng(3).integers(0, 128, (2, 6)).astype(np.int32)

    def loss(m, p):
        return jnp.mean(jax.nn.log_softmax(m.apply(p, ids))[..., 0])

    base_val, base_grad = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(model.params)
    for policy in ("full", "dots"):
        m = Model(CFG.replace(remat=policy))
        val, grad = jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(model.params)
        np.testing.assert_allclose(val, base_val, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, base_grad)


def _saved_residuals(m, p, ids):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda p: jnp.mean(m.apply(p, ids)), p)
    return out.getvalue().splitlines()


def test_dot_remat_policies_keep_every_projection_output(model):
    """JAX's dot policies keep the outputs of the layer's matmuls for the backward: without batch
    dims (``dots_no_batch``) the q/k/v/o and gate/up/down projections, so the [B, T, F] gate and up
    outputs of each layer are saved, and under ``full`` nothing inside a layer is. The CPU dense
    layer's dot sits inside a custom-VJP call those policies cannot see into; this holds on every
    backend."""
    B, T, L, F, H, Dh = 2, 6, CFG.num_layers, CFG.intermediate_size, CFG.num_heads, CFG.head_dim
    ids = np.random.default_rng(3).integers(0, 128, (B, T)).astype(np.int32)
    count = lambda lines, shape: sum(f"f32[{','.join(map(str, shape))}]" in line for line in lines)
    full = _saved_residuals(Model(CFG.replace(remat="full")), model.params, ids)
    assert count(full, (B, T, F)) == 0
    for policy in ("dots_no_batch", "dots"):
        saved = _saved_residuals(Model(CFG.replace(remat=policy)), model.params, ids)
        assert count(saved, (B, T, F)) == 2 * L, (policy, saved)
        assert count(saved, (B, T, H, Dh)) >= L, (policy, saved)


def test_logical_axes_match_params_and_init_is_sharded():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    m = Model(CFG, mesh=mesh)
    params = m.init(jax.random.PRNGKey(0))
    axes = m.logical_axes
    flat_p = jax.tree.leaves_with_path(params)
    flat_a = jax.tree.leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert [k for k, _ in flat_p] == [k for k, _ in flat_a]
    for (_, x), (_, a) in zip(flat_p, flat_a):
        assert len(a) == x.ndim
    assert axes["layers_0"]["self_attn"]["o_proj"]["kernel"] == ("heads", "head_dim", "embed")
    assert params["lm_head"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # Same seed, same values as the unsharded init.
    one = Model(CFG).init(jax.random.PRNGKey(0))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, one)
    # Cached decoding on the mesh (batch 1 does not divide the batch axes: it stays replicated).
    cache = m.init_cache(1, 8)
    ids = np.array([[3, 4, 5]], np.int32)
    logits, _ = jax.jit(m.decode)(params, ids, cache, positions=np.arange(3, dtype=np.int32)[None])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(jax.jit(Model(CFG).apply)(one, ids)), atol=1e-5)


# Published parameter counts (HF safetensors metadata / model cards).
KNOWN_COUNTS = {
    "llama2-7b": 6_738_415_616,
    "llama3-1b": 1_235_814_400,
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
}


def formula_count(c):
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    bias = c.head_dim * (c.num_heads + 2 * c.num_kv_heads) if c.attention_bias else 0
    norms = 2 * c.hidden_size + (2 * c.head_dim if c.qk_norm else 0)
    per_layer = attn + bias + norms + 3 * c.hidden_size * c.intermediate_size
    emb = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_layers * per_layer + emb + c.hidden_size


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name):
    abstract = Model(PRESETS[name]).abstract_params()
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    assert count == formula_count(PRESETS[name])
    if name in KNOWN_COUNTS:
        assert count == KNOWN_COUNTS[name]


def test_tiny_preset_is_seeded_and_hidden_matches_logits():
    a, b = from_pretrained("tiny"), from_pretrained("tiny")
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)
    assert a.config.num_layers == 2 and a.config.hidden_size == 64 and a.config.vocab_size == 256
    assert PRESETS["bench-7m"].vocab_size == 8192 and PRESETS["bench-7m"].intermediate_size == 688
    ids = np.arange(10, dtype=np.int32).reshape(2, 5)
    hidden, logits = jax.jit(lambda p: (a.hidden(p, ids), a.apply(p, ids)))(a.params)
    np.testing.assert_allclose(np.asarray(hidden @ a.unembedding(a.params)), np.asarray(logits), atol=1e-5)


def test_bad_config_messages():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        ModelConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="model_type='gpt2'.*supported"):
        ModelConfig(model_type="gpt2")
    with pytest.raises(ValueError, match="remat='sometimes'"):
        ModelConfig(remat="sometimes")
