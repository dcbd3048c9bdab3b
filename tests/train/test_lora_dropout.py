"""LoRA dropout (PEFT's ``lora_dropout``: inverted dropout on the adapter's input, training only).

On one projection the sampled outputs average to the deterministic one and vary around it; the
model without a dropout key is exactly the model without dropout (evaluation, the reference,
export); the train step draws its keys from the state, so a step is reproducible and a run stopped
and continued equals an uninterrupted one; jobs that train their own objective refuse it.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from alignjax.models import PRESETS, Model
from alignjax.models.config import LoraConfig
from alignjax.models.transformer import Proj
from alignjax.train import step as steplib
from alignjax.train.loop import run_train
from tests.train.conftest import SMALL, pair_batches, run_config, stack  # noqa: F401  (a fixture)

RATE = 0.3


def _with_random_b(params, seed=3):
    """Adapters with a non-zero B (B starts at 0, where dropout changes nothing)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    key = jax.random.PRNGKey(seed)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        name = jax.tree_util.keystr(path)
        out.append(0.2 * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
                   if "lora_b" in name else leaf)
    return jax.tree_util.tree_unflatten(tree, out)


def test_one_projections_dropout_is_unbiased_and_random():
    lora = LoraConfig(rank=4, dropout=RATE)
    proj = Proj(in_shape=(16,), out_shape=(8,), axes=(None, None), use_bias=False, dtype=jnp.float32,
                param_dtype=jnp.float32, lora=lora)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16))
    params = _with_random_b(proj.init(jax.random.PRNGKey(1), x)["params"])
    plain = proj.apply({"params": params}, x)
    draws = jax.vmap(lambda k: proj.apply({"params": params}, x, rngs={"dropout": k}))(
        jax.random.split(jax.random.PRNGKey(2), 4000))
    spread = np.asarray(draws).std(0)
    assert spread.min() > 1e-3  # every output varies with the mask
    np.testing.assert_allclose(np.asarray(draws).mean(0), plain, atol=4 * spread.max() / np.sqrt(4000))


def _model(rate, mesh=None):
    return Model(PRESETS["tiny"].replace(**SMALL, lora=LoraConfig(rank=4, dropout=rate)), mesh=mesh)


def test_without_a_key_the_model_is_the_model_without_dropout():
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 15, (2, 10)), jnp.int32)
    params = _with_random_b(_model(0.0).init(jax.random.PRNGKey(0)))
    off = _model(0.0).apply(params, ids)
    np.testing.assert_array_equal(_model(RATE).apply(params, ids), off)
    on = _model(RATE).apply(params, ids, dropout_rng=jax.random.PRNGKey(5))
    assert not np.allclose(on, off)


def test_the_train_step_draws_its_keys_from_the_state(pair_batches):  # noqa: F811
    model = _model(RATE)
    config = ml_collections.ConfigDict(dict(loss=dict(name="sigmoid", beta=0.1), data=dict(kind="pairwise"),
                                            train=dict(nan_at_step=-1)))
    spec = steplib.make_step_spec(config, 8, "model")
    tx = optax.sgd(0.1)
    params = _with_random_b(model.init(jax.random.PRNGKey(0)))
    trainable, _ = steplib.lora.partition(params)
    state = {"params": params, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.PRNGKey(7)}
    batch = {k: jnp.asarray(v) for k, v in stack(pair_batches[8]).items()}
    step = jax.jit(steplib.make_train_step(model, spec, tx, optax.constant_schedule(0.1)))
    a, ma = step(state, batch)
    b, mb = step(state, batch)
    c, mc = step(dict(state, rng=jax.random.PRNGKey(8)), batch)
    jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
    assert float(ma["loss"]) == float(mb["loss"]) != float(mc["loss"])
    _, mp = jax.jit(steplib.make_train_step(_model(0.0), spec, tx, optax.constant_schedule(0.1)))(
        state, batch)
    assert float(mp["loss"]) != float(ma["loss"])


def test_a_run_with_lora_dropout_stopped_and_continued_equals_the_uninterrupted_run(tmp_path):
    source = "synthetic:arithmetic_dpo:train"

    def config(steps):
        c = run_config("sigmoid", source, steps=steps)
        c.model.lora.update(dict(rank=4, dropout=0.1))
        c.optim.schedule = "constant"  # the same learning rates whatever num_steps says
        c.train.checkpoint_every = 2
        return c

    run_train(config(4), str(tmp_path / "clean"))
    run_train(config(2), str(tmp_path / "stopped"))
    run_train(config(4), str(tmp_path / "stopped"))
    rows = {k: [json.loads(x) for x in open(tmp_path / k / "metrics.jsonl") if '"loss"' in x]
            for k in ("clean", "stopped")}
    assert [r["step"] for r in rows["clean"]] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows["stopped"]] == [r["loss"] for r in rows["clean"]]


def test_jobs_with_their_own_objective_refuse_lora_dropout():
    model = _model(RATE)
    config = ml_collections.ConfigDict(dict(loss=dict(name="sigmoid"), data=dict(kind="pairwise"),
                                            train=dict(nan_at_step=-1)))
    spec = steplib.make_step_spec(config, 8, "model")
    with pytest.raises(ValueError, match=r"config.model.lora.dropout > 0: LoRA dropout is applied by the "
                                         r"preference step only"):
        steplib.make_train_step(model, spec, optax.sgd(0.1), optax.constant_schedule(0.1),
                                loss_fn=lambda *a: None)
