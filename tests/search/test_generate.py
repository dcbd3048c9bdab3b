"""KV-cache generation == step-by-step full recomputation; stops; no recompilation; self-evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.models import from_pretrained
from alignjax.search.generate import Generator, row_keys, sample_next, top_p_mask

M = 8  # new tokens


@pytest.fixture(scope="module")
def setup():
    model = from_pretrained("tiny")
    gen = Generator(model)

    @jax.jit
    def step(params, ids, last, key, row, t, temperature, top_p, greedy):
        logits = model.apply(params, ids)[:, last]
        return sample_next(logits, row_keys(key, row[None], t), temperature, top_p, greedy)

    return model, gen, step


WIDTH = 32  # fixed padded width of the reference: causal attention makes the trailing pads irrelevant


def padded(seq):
    ids = np.zeros((1, WIDTH), np.int32)
    ids[0, : len(seq)] = seq
    return jnp.asarray(ids)


def reference(step, params, prompt, key, row, *, greedy, temperature=1.0, top_p=1.0, stop=()):
    """Full forward pass over the whole sequence at every step (no cache), same per-row keys."""
    seq, toks, lps = list(prompt), [], []
    for t in range(M):
        tok, lp = step(params, padded(seq), len(seq) - 1, key, jnp.int32(row), t, jnp.float32(temperature),
                       jnp.float32(top_p), greedy)
        toks.append(int(tok[0]))
        lps.append(float(lp[0]))
        seq.append(int(tok[0]))
        if toks[-1] in stop:
            break
    return toks, np.array(lps)


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]


@pytest.mark.parametrize("greedy,temperature,top_p", [(True, 1.0, 1.0), (False, 0.7, 0.9), (False, 1.0, 1.0)])
def test_cache_equals_full_recomputation(setup, greedy, temperature, top_p):
    model, gen, step = setup
    key = jax.random.PRNGKey(3)
    n = 2
    out = gen.generate(model.params, PROMPTS, key, num_samples=n, max_new_tokens=M, greedy=greedy,
                       temperature=temperature, top_p=top_p)
    for i, prompt in enumerate(PROMPTS):
        for j in range(n):
            toks, lps = reference(step, model.params, prompt, key, i * n + j, greedy=greedy,
                                  temperature=temperature, top_p=top_p)
            got_toks, got_lps = out.row(i, j)
            assert got_toks == toks
            np.testing.assert_allclose(got_lps, lps, atol=1e-5)
    assert out.lengths.tolist() == [[M] * n] * len(PROMPTS) and not out.stopped.any()
    if not greedy:  # the two samples of a prompt differ (distinct row keys)
        assert out.row(0, 0)[0] != out.row(0, 1)[0]


def test_stop_tokens(setup):
    model, gen, step = setup
    key = jax.random.PRNGKey(0)
    free = gen.generate(model.params, PROMPTS, key, greedy=True, max_new_tokens=M)
    stop = int(free.tokens[0, 0, 2])  # the 3rd greedy token of prompt 0 becomes a stop token
    out = gen.generate(model.params, PROMPTS, key, greedy=True, max_new_tokens=M, stop_tokens=(stop,))
    first = list(free.tokens[0, 0]).index(stop)
    assert out.lengths[0, 0] == first + 1 and out.stopped[0, 0]
    assert out.tokens[0, 0, : first + 1].tolist() == free.tokens[0, 0, : first + 1].tolist()
    assert (out.tokens[0, 0, first + 1:] == gen.pad_id).all() and (out.logps[0, 0, first + 1:] == 0).all()
    row1 = free.tokens[1, 0].tolist()
    expect1 = row1.index(stop) + 1 if stop in row1 else M
    assert out.lengths[1, 0] == expect1 and out.tokens[1, 0, :expect1].tolist() == row1[:expect1]
    toks, _ = reference(step, model.params, PROMPTS[0], key, 0, greedy=True, stop=(stop,))
    assert out.row(0, 0)[0] == toks


def test_no_recompilation_within_bucket(setup):
    model, gen, _ = setup
    key = jax.random.PRNGKey(1)
    kw = dict(num_samples=2, max_new_tokens=M, temperature=0.9)  # the static args of the tests above
    gen.generate(model.params, [[5, 6, 7]], key, **kw)
    before = gen.num_traces
    gen.generate(model.params, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]], key, **kw)  # 11 tokens: same bucket 16
    gen.generate(model.params, [[9] * 16], jax.random.PRNGKey(2), **{**kw, "temperature": 0.5})
    gen.generate(model.params, [[9] * 2], key, **kw, stop_tokens=(4, 7), greedy=True)  # stops, greedy: data
    assert gen.num_traces == before
    gen.generate(model.params, [[9] * 17], key, **kw)  # length bucket 32: one new trace
    assert gen.num_traces == before + 1


def test_top_p_mask_numpy():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    # sorted masses 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95; top_p 0.75 keeps the first two
    kept = np.isfinite(np.asarray(top_p_mask(logits, jnp.float32(0.75))))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(top_p_mask(logits, jnp.float32(0.1))))
    assert kept.tolist() == [[True, False, False, False]]


def test_self_evaluate(setup):
    model, gen, _ = setup
    seqs = [[5, 6, 7], [8, 9, 10, 11]]
    p = gen.self_evaluate(model.params, seqs, yes_id=20, no_id=21)
    p_raw = gen.self_evaluate(model.params, seqs, yes_id=20)
    ids = np.zeros((2, 4), np.int32)
    ids[0, :3], ids[1] = seqs[0], seqs[1]
    logits = np.asarray(jax.jit(model.apply)(model.params, jnp.asarray(ids))).astype(np.float64)
    for i, s in enumerate(seqs):
        last = logits[i, len(s) - 1]
        assert p[i] == pytest.approx(np.exp(last[20]) / (np.exp(last[20]) + np.exp(last[21])), abs=1e-6)
        assert p_raw[i] == pytest.approx(np.exp(last[20]) / np.exp(last).sum(), abs=1e-6)
