"""The decoder's attention core and dense map against independent NumPy/jnp formulas."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.models import transformer


def _numpy_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v per query head, kv head h // (H/K) (HF repeat_kv), in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for head in range(h):
        kv = head // group
        scores = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, kv]) / np.sqrt(d)
        scores = np.where(mask, scores, -np.inf)
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bts,bsd->btd", probs, v[:, :, kv])
    return out


def test_attention_core_matches_numpy_with_grouped_heads_and_packed_mask():
    rng = np.random.default_rng(0)
    b, t, h, kv, d = 2, 6, 4, 2, 8
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k = rng.normal(size=(b, t, kv, d)).astype(np.float32)
    v = rng.normal(size=(b, t, kv, d)).astype(np.float32)
    index = np.broadcast_to(np.arange(t), (b, t))
    segments = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]])  # row 0 packs two sequences
    branches = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 2, 2]])  # row 1: prompt | chosen | rejected
    mask = np.asarray(
        transformer.attention_mask(index, index, segments, segments, branches, branches, index, index, None)
    )
    got = transformer.attention_core(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, mask), atol=1e-5)
    # the rejected branch (row 1, tokens 4-5) never sees the chosen tokens (2-3)
    assert not mask[1, 4:, 2:4].any() and mask[1, 4:, :2].all()


@pytest.mark.parametrize("block", [1, 2])
def test_causal_block_attention_equals_the_full_core_on_packed_and_branched_rows(block):
    """Query blocks that skip the keys after the block (``causal_block``), against the unblocked core
    and float64 NumPy: values and gradients to fp32 rounding (only masked keys are skipped), blocks
    that do not divide the length included."""
    rng = np.random.default_rng(2)
    b, t, h, kv, d = 2, 9, 4, 2, 8  # at least MIN_CAUSAL_BLOCKS blocks of either size
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kv, kv))
    index = np.broadcast_to(np.arange(t), (b, t))
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    branches = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 2, 2, 2, 2]])
    mask = jnp.asarray(
        transformer.attention_mask(index, index, segments, segments, branches, branches, index, index, None)
    )
    weights = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) * mask.any(-1)[..., None, None]

    def loss(block):
        return lambda q, k, v: jnp.sum(
            transformer.attention_core(q, k, v, mask, causal_block=block) * weights
        )

    full = transformer.attention_core(q, k, v, mask)
    blocked = jax.jit(lambda q, k, v: transformer.attention_core(q, k, v, mask, causal_block=block))(q, k, v)
    unblocked = jax.jit(transformer.attention_core)(q, k, v, mask)
    dots = lambda blk: str(
        jax.make_jaxpr(lambda q: transformer.attention_core(q, k, v, mask, causal_block=blk))(q)
    )
    assert dots(block).count("dot_general") == 2 * -(-t // block) > dots(None).count("dot_general") == 2
    rows = np.asarray(mask.any(-1))  # padding queries' outputs are arbitrary on either path
    np.testing.assert_allclose(np.asarray(blocked)[rows], np.asarray(unblocked)[rows], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(full)[rows], _numpy_attention(q, k, v, np.asarray(mask))[rows], atol=1e-5
    )
    g_full = jax.grad(loss(None), argnums=(0, 1, 2))(q, k, v)
    g_blocked = jax.jit(jax.grad(loss(block), argnums=(0, 1, 2)))(q, k, v)
    for a, c in zip(g_blocked, g_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)


def _packed_padded_case(dtype):
    """q, k, v, the mask and output weights of 2 rows x 12 tokens, 4 query heads on 2 kv heads: row 0
    packs two sequences and ends in two padding queries (fully masked rows), row 1 is a shared prompt
    with two branches."""
    rng = np.random.default_rng(5)
    b, t, h, kv, d = 2, 12, 4, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), dtype) for n in (h, kv, kv))
    index = np.broadcast_to(np.arange(t), (b, t))
    segments = np.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12])
    branches = np.array([[0] * 12, [0] * 4 + [1] * 4 + [2] * 4])
    mask = jnp.asarray(
        transformer.attention_mask(index, index, segments, segments, branches, branches, index, index, None)
    )
    weights = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    return q, k, v, mask, weights


def _jax_fp32_attention(mask):
    """``jax.nn.dot_product_attention``'s XLA path on ``mask``, the independent reference."""
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=q.shape[-1] ** -0.5, implementation="xla"
    )


@pytest.mark.parametrize("block", [None, 3])
def test_bf16_attention_core_matches_fp32_jax_attention_values_and_gradients(block):
    """bf16 q, k, v (on CPU: the core with bf16 matmuls and its own backward): values against float64
    NumPy and gradients against ``jax.grad`` of ``jax.nn.dot_product_attention`` in fp32, both on
    the same bf16-rounded inputs, to bf16 rounding. The rows include packed sequences and padding
    queries (fully masked rows, whose outputs nothing reads) with nonzero cotangents: their
    gradient reaches v through the uniform probabilities of a fully masked row and must reach
    neither q nor k, as under JAX's own masked softmax."""
    q, k, v, mask, weights = _packed_padded_case(jnp.bfloat16)
    q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k, v))

    def ours(q, k, v):
        return transformer.attention_core(q, k, v, mask, causal_block=block)

    out = jax.jit(ours)(q, k, v)
    assert out.dtype == jnp.bfloat16
    rows = np.asarray(mask.any(-1))
    want = _numpy_attention(q32, k32, v32, np.asarray(mask))
    np.testing.assert_allclose(np.asarray(out, np.float64)[rows], want[rows], rtol=2e-2, atol=2e-2)

    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * weights)
    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss(_jax_fp32_attention(mask)), argnums=(0, 1, 2))(q32, k32, v32)
    for name, a, c in zip("qkv", got, ref):
        assert a.dtype == jnp.bfloat16
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - c)) / jnp.max(jnp.abs(c)))
        assert err < 2e-2, (name, err)
    assert not np.asarray(got[0])[~rows].any()  # padding queries get no gradient


@pytest.mark.parametrize("block", [None, 3])
def test_fp32_attention_core_equals_jax_attention_values_and_gradients(block):
    """fp32 (on CPU: the folded-head core with its own backward) against ``jax.nn.dot_product_attention``
    and its ``jax.grad``: values and all three gradients to fp32 rounding, padding queries (with
    nonzero cotangents) included; and against float64 NumPy for the values."""
    q, k, v, mask, weights = _packed_padded_case(jnp.float32)
    ours = lambda q, k, v: transformer.attention_core(q, k, v, mask, causal_block=block)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * weights)
    rows = np.asarray(mask.any(-1))
    out = np.asarray(jax.jit(ours)(q, k, v))
    np.testing.assert_allclose(out[rows], _numpy_attention(q, k, v, np.asarray(mask))[rows], atol=1e-5)
    if block is None:  # a padding row's output is arbitrary; unblocked, it is JAX's too
        np.testing.assert_allclose(out, np.asarray(_jax_fp32_attention(mask)(q, k, v)), rtol=1e-5, atol=1e-6)
    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss(_jax_fp32_attention(mask)), argnums=(0, 1, 2))(q, k, v)
    for name, a, c in zip("qkv", got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5, err_msg=name)
    assert not np.asarray(got[0])[~rows].any()  # padding queries get no gradient


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusions")
def test_cpu_fp32_attention_gradient_never_copies_a_score_matrix():
    """The performance property behind ``_cpu_attention`` in fp32: compiled, the gradient of the core
    has no copy or transpose fusion of score-sized data (the [T, S] matrices of every head). JAX's
    own XLA path had several per layer: strided loops that cost 165 ms of a 1.3 s bench-7m step."""
    rng = np.random.default_rng(6)
    b, t, h, kv, d = 2, 48, 4, 2, 8  # a score matrix per head (t x t) larger than q, k and v
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kv, kv))
    index = np.broadcast_to(np.arange(t), (b, t))
    segments = (index < np.array([[t], [t - 5]])).astype(np.int32)  # row 1 ends in padding
    none = np.zeros_like(index)  # no branches
    mask = transformer.attention_mask(index, index, segments, segments, none, none, index, index, None)
    weights = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    loss = lambda q, k, v: jnp.sum(transformer.attention_core(q, k, v, mask) * weights)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    hlo = fn.lower(q, k, v).compile().as_text()
    score_elements = b * h * t * t
    copies = [
        shape
        for name, shape in re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = f32\[([\d,]*)\]", hlo, re.M)
        if re.search(r"copy|transpose", name) and math.prod(map(int, shape.split(","))) >= score_elements
    ]
    assert hlo.count(" dot(") == 6 and copies == [], copies


def test_bf16_rms_norm_scale_gradient_sums_fp32_products():
    """bf16 compute, fp32 scale: the forward is HF's bf16 ``weight * hidden`` (bitwise), and the scale's
    gradient is the fp32 sum of g x normed over all rows, as ``jax.grad`` of the fp32 product on the
    same bf16 values gives it (autodiff of the bf16 product rounds every product to bf16 first)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(8, 64, 32)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(8, 64, 32)), jnp.bfloat16)
    norm = transformer.RMSNorm(1e-6, jnp.float32)
    params = {"params": {"scale": jnp.asarray(1 + 0.1 * rng.normal(size=32), jnp.float32)}}
    out, vjp = jax.vjp(lambda p: norm.apply(p, x), params)
    normed = (
        x.astype(jnp.float32)
        * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6)
    ).astype(jnp.bfloat16)
    scale = params["params"]["scale"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), np.asarray(scale.astype(jnp.bfloat16) * normed))
    got = vjp(g)[0]["params"]["scale"]
    want = jax.grad(lambda w: jnp.sum(w * normed.astype(jnp.float32) * g.astype(jnp.float32)))(scale)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_rounds_as_pytorchs_silu_product(dtype):
    """The MLP's activation against PyTorch's ``F.silu(gate) * up`` (HF's LlamaMLP) on the same
    tensors. In bf16 PyTorch computes silu in fp32 and rounds once, and so does ``swiglu``: the two
    agree bitwise (every value of 30 seeds on Zen 4) except where the two libraries' fp32 silu, up
    to 2 fp32 ulps apart, may straddle a bf16 rounding boundary, then one bf16 ulp apart.
    (``jax.nn.silu`` on the bf16 tensor, rounding after each op, differs on a third of them.) fp32:
    to fp32 rounding."""
    import torch

    rng = np.random.default_rng(8)
    gate, up = (rng.normal(size=(64, 688)).astype(np.float32) * s for s in (3, 1))
    tdtype = getattr(torch, dtype)
    want = torch.nn.functional.silu(torch.tensor(gate, dtype=tdtype)) * torch.tensor(up, dtype=tdtype)
    got = transformer.swiglu(jnp.asarray(gate, dtype), jnp.asarray(up, dtype))
    assert got.dtype == jnp.dtype(dtype)
    got, want = np.asarray(got.astype(jnp.float32)), want.float().numpy()
    if dtype == "float32":
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        return
    differ = got != want
    assert differ.mean() < 1e-3, differ.mean()
    # one bf16 ulp of silu, carried through the product's own rounding
    np.testing.assert_allclose(got[differ], want[differ], rtol=2**-6)


@pytest.mark.parametrize("n_in", [1, 2])
def test_dense_values_and_gradients_equal_tensordot(n_in):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 5, 4, 6) if n_in == 2 else (3, 5, 24)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(4, 6, 7) if n_in == 2 else (24, 7)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.tanh(f(x, w)) * weights)

    ours = jax.jit(jax.value_and_grad(loss(lambda a, w: transformer.dense(a, w, n_in)), argnums=(0, 1)))
    ref = jax.value_and_grad(loss(lambda a, w: jnp.tensordot(a, w, axes=n_in)), argnums=(0, 1))
    (v1, (gx1, gw1)), (v2, (gx2, gw2)) = ours(x, kernel), ref(x, kernel)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(gx1, gx2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw1, gw2, rtol=1e-5, atol=1e-5)


def _bf16(a):
    """bf16-rounded values as float64 (what a bf16 matmul multiplies)."""
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("kernel_shape", [(16, 40), (16, 2, 20)])
def test_mixed_precision_logits_values_and_gradients_match_numpy(kernel_shape):
    """bf16 hidden @ fp32 kernel: fp32 logits of the bf16-rounded operands; the backward rounds the
    logits cotangent to bf16, returns dh in bf16 and dW (fp32 kernel) from the fp32 accumulator."""
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=kernel_shape) * 0.3, jnp.float32)
    g = rng.normal(size=(3, 5, *kernel_shape[1:])).astype(np.float32)
    logits, vjp = jax.vjp(transformer.mixed_precision_logits, hidden, kernel)
    dh, dk = vjp(jnp.asarray(g))
    h64, k64, g64 = _bf16(hidden), _bf16(kernel), _bf16(g)
    assert logits.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.tensordot(h64, k64, axes=1), rtol=1e-5, atol=1e-5)
    want_dh = np.tensordot(g64, k64, axes=(range(2, g.ndim), range(1, k64.ndim)))
    np.testing.assert_allclose(np.asarray(dh, np.float64), want_dh, rtol=1e-2, atol=1e-2)  # bf16 output
    want_dk = np.tensordot(h64, g64, axes=([0, 1], [0, 1]))
    np.testing.assert_allclose(np.asarray(dk), want_dk, rtol=1e-5, atol=1e-5)
    # fp32 hidden: exactly the fp32 matmul and its ordinary gradient
    h32 = hidden.astype(jnp.float32)
    ours = jax.vjp(transformer.mixed_precision_logits, h32, kernel)
    plain = jax.vjp(lambda h, k: jnp.tensordot(h, k, axes=1), h32, kernel)
    np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6)
    for a, b in zip(ours[1](jnp.asarray(g)), plain[1](jnp.asarray(g))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_log_prob_gradient_has_no_fp32_vocabulary_matmul():
    """The performance property behind ``mixed_precision_logits``: with bf16 compute and fp32 master
    weights, no vocabulary-sized matmul of the log-prob gradient (dense or vocabulary-chunked) runs
    on fp32 operands. (The attention core's are checked on CPU by
    ``test_cpu_bf16_log_prob_gradient_runs_every_dot_on_ynnpack``.)"""
    from jax.extend.core import jaxprs_in_params

    from alignjax import logprobs
    from alignjax.models import PRESETS, Model

    vocab, chunk = 200, 40  # sizes no other dimension of the model has
    model = Model(PRESETS["tiny"].replace(param_dtype="float32", dtype="bfloat16", vocab_size=vocab))
    params = model.init(jax.random.PRNGKey(0))
    ids = jnp.ones((2, 8), jnp.int32)
    batch = dict(
        input_ids=ids,
        segment_ids=jnp.ones_like(ids),
        positions=jnp.broadcast_to(jnp.arange(8), (2, 8)),
        loss_mask=jnp.ones((2, 8), jnp.float32),
        example_ids=jnp.asarray([[0] * 8, [1] * 8]),
    )

    def vocabulary_dots(jaxpr):
        for eqn in jaxpr.eqns:
            shapes = [v.aval.shape for v in eqn.invars]
            if eqn.primitive.name == "dot_general" and any({vocab, chunk} & set(s) for s in shapes):
                yield tuple(str(v.aval.dtype) for v in eqn.invars)
            for sub in jaxprs_in_params(eqn.params):
                yield from vocabulary_dots(sub)

    for vocab_chunk in (None, chunk):
        fn = jax.grad(
            lambda p, c=vocab_chunk: logprobs.batch_sequence_logps(model, p, batch, 2, vocab_chunk=c)[0].sum()
        )
        dtypes = list(vocabulary_dots(jax.make_jaxpr(fn)(params).jaxpr))
        # forward, dh and dW of the head (the chunked path: inside its scan, once each)
        assert len(dtypes) >= 3 and set(dtypes) == {("bfloat16", "bfloat16")}, (vocab_chunk, dtypes)


def _compiled_dots(hlo: str) -> list[tuple[bool, str]]:
    """The dot instructions of compiled CPU HLO text, each as (inside a YNNPACK fusion,
    ``"result = dot(lhs type, rhs type)"``)."""
    ynn_bodies = set(re.findall(r"calls=(%[\w.\-]+), [^\n]*__ynn_fusion", hlo))
    types = dict(re.findall(r"^\s*(?:ROOT )?(%[\w.\-]+) = (\w+\[[\d,]*\])", hlo, re.M))
    found = []
    for block in re.split(r"\n(?=\S)", hlo):
        name = re.match(r"(?:ENTRY )?(%[\w.\-]+)", block)
        if name is None:
            continue
        for line in block.split("\n"):
            dot = re.match(r"\s*(?:ROOT )?%\S+ = (\w+\[[\d,]*\])\S* dot\((%[\w.\-]+), (%[\w.\-]+)\)", line)
            if dot:
                signature = f"{dot.group(1)} = dot({types.get(dot.group(2))}, {types.get(dot.group(3))})"
                found.append((name.group(1) in ynn_bodies, signature))
    return found


def _compiled_log_prob_gradient(config):
    """The gradient of a decoder's sequence log-probs (4 rows of 16 tokens) compiled as ``run_train``
    compiles (``logprobs.strict_rounding`` of the compute dtype), and the params it takes."""
    from alignjax import logprobs
    from alignjax.models import Model

    model = Model(config)
    params = model.init(jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, config.vocab_size)
    batch = dict(
        input_ids=ids,
        segment_ids=jnp.ones_like(ids),
        positions=jnp.broadcast_to(jnp.arange(16), (4, 16)),
        loss_mask=jnp.ones((4, 16), jnp.float32),
        example_ids=jnp.broadcast_to(jnp.arange(4)[:, None], (4, 16)),
    )
    fn = jax.jit(
        jax.grad(lambda p: logprobs.batch_sequence_logps(model, p, batch, 4)[0].sum()),
        compiler_options=logprobs.strict_rounding(config.dtype),
    )
    return fn.lower(params).compile(), params


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's dot placement")
@pytest.mark.parametrize("tied, scan", [(False, False), (True, True)])
def test_cpu_bf16_log_prob_gradient_runs_every_dot_on_ynnpack(tied, scan):
    """CPU, bf16 compute, compiled as ``run_train`` compiles (``logprobs.strict_rounding``): every dot
    of the log-prob gradient is a YNNPACK call. XLA:CPU's own bf16 dot is an fp32 gemm on upcast
    operands (3-5x slower), and a dot of two transposed operands -- what the simplifier made of a
    tied embedding's transposed weight gradient -- had no CPU kernel at all ("Unsupported element
    type for DotThunk"); and the attention core's matmuls on fp32 operands (its probabilities and
    cotangents), which YNNPACK runs at fp32 rates. The gradient then runs and is finite."""
    from alignjax.models import PRESETS

    config = PRESETS["tiny"].replace(
        param_dtype="float32", dtype="bfloat16", tie_word_embeddings=tied, scan_layers=scan
    )
    compiled, params = _compiled_log_prob_gradient(config)
    hlo = compiled.as_text()
    assert hlo.count("__ynn_fusion") >= 3  # at least the head's forward, dh and dW
    dots = _compiled_dots(hlo)
    assert [sig for inside, sig in dots if not inside] == []
    # per layer (once, in the scan's body, when scanned): 7 dense maps x 3 matmuls and the attention
    # core's 6; the head's 3; and the identity matmul that materialises the RoPE tables
    assert len(dots) == (1 if scan else config.num_layers) * (21 + 6) + 3 + 1, dots
    assert [sig for _, sig in dots if sig.count("bf16[") != 2] == []
    grads = compiled(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def _splash_batch(rows=8, length=128):
    """Token ids, positions and segment ids [rows, length]: whole rows, two packed sequences, padding."""
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 200, (rows, length))
    seg = np.ones((rows, length), np.int32)
    pos = np.tile(np.arange(length), (rows, 1))
    seg[0, 60:], pos[0, 60:] = 2, pos[0, 60:] - 60  # two packed sequences
    seg[1, 100:] = 0  # right padding
    seg[2, 30:90], pos[2, 30:] = 2, pos[2, 30:] - 30
    seg[2, 90:] = 0
    return (jnp.asarray(a, jnp.int32) for a in (ids, pos, seg))


def test_splash_attention_core_matches_numpy_with_grouped_heads_and_segments():
    """The Pallas splash kernel (interpret mode on CPU) against the NumPy softmax attention, for
    every query that is not padding."""
    rng = np.random.default_rng(5)
    b, t, h, kv, d = 2, 128, 4, 2, 16
    q, k, v = (rng.normal(size=(b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
    seg = np.ones((b, t), np.int32)
    seg[0, 50:] = 2
    seg[1, 100:] = 0
    index = np.broadcast_to(np.arange(t), (b, t))
    zeros = np.zeros((b, t), np.int32)
    mask = np.asarray(transformer.attention_mask(index, index, seg, seg, zeros, zeros, index, index, None))
    got = transformer.splash_attention(*(jnp.asarray(a) for a in (q, k, v, seg)))
    real = seg > 0
    np.testing.assert_allclose(np.asarray(got)[real], _numpy_attention(q, k, v, mask)[real], atol=2e-5)


@pytest.mark.parametrize("mesh_shape", [None, {"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_splash_model_equals_xla_model_values_and_gradients(mesh_shape):
    """``attention_kernel="splash"`` gives the XLA path's logits and parameter gradients on packed and
    padded rows, unsharded and under ``shard_map`` with batch and heads split."""
    from alignjax import sharding
    from alignjax.models import PRESETS, Model

    mesh = sharding.make_mesh(mesh_shape) if mesh_shape else None
    ids, pos, seg = _splash_batch()
    config = PRESETS["tiny"].replace(vocab_size=200)
    xla = Model(config.replace(attention_kernel="xla"), mesh=mesh)
    splash = Model(config.replace(attention_kernel="splash"), mesh=mesh)
    params = xla.init(jax.random.PRNGKey(0))
    real = np.asarray(seg) > 0

    def loss(model):
        logits = lambda p: model.apply(p, ids, positions=pos, segment_ids=seg)
        return lambda p: jnp.sum(jnp.where(real[..., None], jnp.tanh(logits(p)), 0.0))

    (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(loss(m)))(params) for m in (xla, splash))
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):  # fp32 sums of up to ~300
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
    assert "pallas_call" in str(jax.make_jaxpr(loss(splash))(params))


def test_splash_is_used_only_where_it_applies():
    """Shared-prompt branches, lengths that are not a multiple of the tile, and ``"auto"`` off TPU
    keep the mask path (no Pallas call); ``"xla"`` never uses it."""
    from alignjax.models import PRESETS, Model

    config = PRESETS["tiny"].replace(vocab_size=200)
    ids, pos, seg = _splash_batch(rows=4)
    params = Model(config).init(jax.random.PRNGKey(0))

    def uses_splash(kernel, ids=ids, **inputs):
        model = Model(config.replace(attention_kernel=kernel))
        return "pallas_call" in str(jax.make_jaxpr(lambda p: model.apply(p, ids, **inputs))(params))

    assert uses_splash("splash", segment_ids=seg)
    assert not uses_splash("splash", segment_ids=seg, branch_ids=jnp.zeros_like(ids))
    assert not uses_splash("splash", ids=ids[:, :100])
    assert not uses_splash("auto", segment_ids=seg)  # CPU: splash only where asked
    assert not uses_splash("xla", segment_ids=seg)


@pytest.mark.parametrize("scaling", [None, "llama3"])
def test_rope_tables_are_transformers_cos_sin(scaling):
    """The cos/sin :func:`transformer.rope_tables` hands every layer against transformers'
    ``LlamaRotaryEmbedding`` (plain and llama3-scaled frequencies) at packed positions, and bitwise
    the unmaterialised ``cos``/``sin`` of the same angles (the CPU identity matmul is exact)."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from alignjax.models import PRESETS

    rope_scaling = None
    if scaling:
        rope_scaling = dict(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
        )
    cfg = PRESETS["tiny"].replace(rope_theta=5000.0, rope_scaling=rope_scaling)
    positions = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [7, 8, 9, 90, 91, 92, 93, 500, 501, 502]])
    inv_freq = transformer.rope_inv_freq(cfg)
    cos, sin = jax.jit(lambda p: transformer.rope_tables(p, inv_freq, jnp.float32))(jnp.asarray(positions))
    hf = LlamaConfig(
        hidden_size=cfg.num_heads * cfg.head_dim, num_attention_heads=cfg.num_heads, head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta, max_position_embeddings=1024,
        rope_scaling=rope_scaling and dict(rope_type="llama3", **rope_scaling),
    )  # fmt: skip
    want_cos, want_sin = LlamaRotaryEmbedding(hf)(torch.zeros(1), torch.as_tensor(positions))
    # the two libraries' frequencies may differ in the last bit, which the angle scales by the position
    tolerance = 1e-6 + 2e-8 * positions[..., None]
    assert np.all(np.abs(np.asarray(cos[:, :, 0]) - want_cos.numpy()) <= tolerance)
    assert np.all(np.abs(np.asarray(sin[:, :, 0]) - want_sin.numpy()) <= tolerance)
    angles = positions[..., None].astype(np.float32) * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None]
    np.testing.assert_array_equal(np.asarray(cos), np.asarray(jax.jit(jnp.cos)(angles)))
    np.testing.assert_array_equal(np.asarray(sin), np.asarray(jax.jit(jnp.sin)(angles)))


def test_bf16_rope_is_hf_rotary_as_torch_autocast_runs_it():
    """bf16 compute: :func:`transformer.apply_rope` bitwise transformers' ``apply_rotary_pos_emb`` as
    it runs under ``torch.autocast`` on fp32 weights: bf16 q from the autocast projection, fp32
    cos/sin (the residual stream's dtype) promoting the product to fp32, and one rounding to bf16
    where the attention kernel casts it. Rounding after every op differs in about a quarter of the
    entries. Compiled as ``run_train`` compiles bf16 (``logprobs.strict_rounding``)."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from alignjax import logprobs
    from alignjax.models import PRESETS

    cfg = PRESETS["tiny"]
    positions = jnp.asarray(np.stack([np.arange(96), np.r_[np.arange(40), np.arange(400, 456)]]))
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 96, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    inv_freq = transformer.rope_inv_freq(cfg)
    rope = jax.jit(
        lambda q, p: transformer.apply_rope(q, transformer.rope_tables(p, inv_freq, jnp.bfloat16)),
        compiler_options=logprobs.strict_rounding("bfloat16"),
    )
    got = np.asarray(rope(q, positions).astype(jnp.float32))
    cos, sin = transformer.rope_tables(positions, inv_freq, jnp.bfloat16)
    as_torch = lambda a: torch.from_numpy(np.array(a.astype(jnp.float32)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = apply_rotary_pos_emb(
            as_torch(q).bfloat16(), as_torch(q).bfloat16(), as_torch(cos[:, :, 0]), as_torch(sin[:, :, 0]),
            unsqueeze_dim=2,
        )  # fmt: skip
    assert want.dtype == torch.float32
    np.testing.assert_array_equal(got, want.bfloat16().float().numpy())


def test_cpu_decoder_gradient_evaluates_rope_once():
    """The performance property behind :func:`transformer.rope_tables`: compiled on CPU, the gradient
    of a 2-layer decoder evaluates cos and sin once each, not in every layer's q and k fusions of the
    forward and backward (a bench-7m DPO step evaluated them 24 times over [B, T, H, Dh])."""
    from alignjax.models import PRESETS, Model

    model = Model(PRESETS["tiny"].replace(num_layers=2))
    params = model.init(jax.random.PRNGKey(0))
    ids = jnp.ones((2, 16), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))

    def loss(p):
        return jnp.sum(model.apply(p, ids, positions=positions, segment_ids=jnp.ones_like(ids)) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert (hlo.count(" cosine("), hlo.count(" sine(")) == (1, 1)


def _max_reduction_sizes(hlo: str) -> list[int]:
    """How many elements each ``maximum`` reduce (or reduce-window) of compiled HLO folds into one."""
    shapes = {
        name: [int(d) for d in dims.split(",") if d]
        for name, dims in re.findall(r"^\s*(?:ROOT )?(%[\w.\-]+) = \w+\[([\d,]*)\]", hlo, re.M)
    }
    maximum_bodies = {
        name
        for name, body in re.findall(r"^(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S)
        if re.search(r"ROOT %\S+ = \S+ maximum\(", body)
    }
    sizes = []
    for line in hlo.splitlines():
        body = re.search(r"to_apply=(%[\w.\-]+)", line)
        if body is None or body.group(1) not in maximum_bodies:
            continue
        if window := re.search(r" reduce-window\(.*window=\{size=([\dx]+)", line):
            sizes.append(math.prod(int(w) for w in window.group(1).split("x")))
        elif reduce := re.search(r" reduce\((%[\w.\-]+), .*dimensions=\{([\d,]*)\}", line):
            operand = shapes[reduce.group(1)]
            sizes.append(math.prod(operand[int(d)] for d in reduce.group(2).split(",")))
    return sizes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's reduction lowering")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_log_prob_gradient_folds_at_most_a_block_per_device_with_maximum(dtype):
    """Compiled as ``run_train`` compiles (``strict_rounding``), the gradient of a decoder's sequence
    log-probs -- the vocabulary logsumexp and the attention softmax -- folds no more elements with
    ``maximum``, the NaN-propagating form XLA:CPU's loop emitter runs about 3x slower, than one per
    device (the blocks of :func:`alignjax.models.softmax.stable_shift`); the rows are 16 keys and
    256 vocabulary entries."""
    from alignjax.models import PRESETS

    compiled, _ = _compiled_log_prob_gradient(PRESETS["tiny"].replace(param_dtype="float32", dtype=dtype))
    hlo = compiled.as_text()
    sizes = _max_reduction_sizes(hlo)
    assert sizes and max(sizes) <= jax.device_count(), sizes
