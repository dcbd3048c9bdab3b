"""Rollouts: the sampler's behaviour log-probs equal a teacher-forced recompute of the same rows, on an
8-device mesh with the params sharded (and the same tokens and log-probs as the unsharded model);
top-k keeps only the k most likely tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.models import from_pretrained
from alignjax.online import rollout
from alignjax.search.generate import Generator, top_k_mask
from alignjax.sharding import make_mesh

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [3]]


@pytest.fixture(scope="module")
def models():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    return from_pretrained("tiny"), from_pretrained("tiny", mesh=mesh)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_behaviour_logps_equal_teacher_forced(models, temperature, top_k, top_p):
    plain, sharded = models
    cfg = rollout.SamplingConfig(num_generations=4, max_new_tokens=6, temperature=temperature, top_k=top_k,
                                 top_p=top_p, stop_tokens=(2,))
    key = jax.random.PRNGKey(0)
    ro = rollout.sample(Generator(sharded), sharded.params, PROMPTS, key, cfg)
    assert ro.completion_ids.shape == (12, 6) and ro.num_generations == 4
    batch = rollout.sequence_batch(ro, width=16)
    tf = jax.jit(lambda p, b: rollout.teacher_forced_logps(sharded, p, b, temperature))(
        sharded.params, {k: jnp.asarray(v) for k, v in batch.items()})
    mask = batch["loss_mask"]
    np.testing.assert_allclose(np.asarray(tf) * mask, batch["old_token_logps"], atol=2e-5)
    assert mask.sum() == ro.lengths.sum() > 0
    # the sharded sampler draws what the single-device one draws
    ref = rollout.sample(Generator(plain), plain.params, PROMPTS, key, cfg)
    np.testing.assert_array_equal(ro.completion_ids, ref.completion_ids)
    np.testing.assert_allclose(ro.behaviour_logps, ref.behaviour_logps, atol=2e-5)
    if temperature == 1.0:
        np.testing.assert_allclose(ro.behaviour_logps, ro.policy_logps, atol=1e-6)


def test_top_k_mask_and_samples_stay_in_top_k(models):
    logits = jnp.asarray([[0.1, 2.0, -1.0, 1.5, 0.3]])
    kept = np.isfinite(np.asarray(top_k_mask(logits, jnp.int32(2))))
    assert kept.tolist() == [[False, True, False, True, False]]
    assert np.isfinite(np.asarray(top_k_mask(logits, jnp.int32(0)))).all()
    plain, _ = models
    gen = Generator(plain)
    out = gen.generate(plain.params, [[5, 6, 7]], jax.random.PRNGKey(1), num_samples=16, max_new_tokens=1,
                       top_k=1)
    greedy = gen.generate(plain.params, [[5, 6, 7]], jax.random.PRNGKey(1), max_new_tokens=1, greedy=True)
    assert set(out.tokens[0, :, 0].tolist()) == {int(greedy.tokens[0, 0, 0])}


def test_prompts_from_batch():
    batch = {"input_ids": np.array([[4, 5, 6, 7, 0], [4, 8, 9, 0, 0]]),
             "loss_mask": np.array([[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]),
             "segment_ids": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])}
    assert rollout.prompts_from_batch(batch) == [[4, 5], [4, 8]]
