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
