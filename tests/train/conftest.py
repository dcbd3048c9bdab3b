"""Shared small pieces: a tiny model on the 15-token arithmetic vocabulary and its batches."""

import numpy as np
import pytest

from alignjax.data import make_preference_batches
from alignjax.models import PRESETS, Model

SMALL = dict(
    vocab_size=16,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=2,
    head_dim=16,
    intermediate_size=64,
)


def small_model(mesh=None):
    return Model(PRESETS["tiny"].replace(**SMALL), mesh=mesh)


def host_batches(batch_size, n, kind="pairwise", source="synthetic:arithmetic_dpo:train"):
    data, _ = make_preference_batches(
        source,
        "arithmetic",
        kind=kind,
        batch_size=batch_size,
        max_length=10,
        buckets=(10,),
        seed=0,
        process_index=0,
        process_count=1,
    )
    return [next(data) for _ in range(n)]


@pytest.fixture(scope="module")
def pair_batches():
    return {8: host_batches(8, 1), 4: host_batches(4, 2)}


def stack(batches):
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def run_config(loss, source, *, steps=3, kind="pairwise", max_length=10, **loss_keys):
    """``experiments/dpo.py:runlocal`` on a data file for ``steps`` steps of the 1-layer model: no
    evaluation, warm-up, progress bar, TensorBoard or plot; one checkpoint at the end."""
    from alignjax.main import load_config_file

    c = load_config_file(f"experiments/dpo.py:runlocal,steps={steps},loss={loss},kind={kind}")
    c.data.source = str(source)
    c.data.eval_source = ""
    c.model.overrides.update(
        dict(vocab_size=16, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    )
    c.data.max_length = max_length
    c.optim.warmup_steps = 0
    c.train.update(dict(checkpoint_every=steps, progress=False, tensorboard=False, plot=False,
                        async_checkpoints=False))
    c.loss.update(loss_keys)
    return c
