"""TFDS and SeqIO sources (slow: imports TensorFlow once; one module-scoped dataset)."""

import numpy as np
import pytest

from alignjax.data import load_records, make_preference_batches, register_seqio_task, synthetic

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("seqio")

RECORDS = synthetic.arithmetic_dpo_records(synthetic.arithmetic_splits(0)["val"][:12])


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    features = tfds.features.FeaturesDict({k: tfds.features.Text() for k in ("prompt", "chosen", "rejected")})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="alignjax_test_prefs",
        version="1.0.0",
        features=features,
        data_dir=data_dir,
        split_datasets={"train": [(f"k{i:03d}", r) for i, r in enumerate(RECORDS)]},
        disable_shuffling=True,
    )
    return data_dir


def test_tfds_and_seqio_read_the_same_records(tfds_dir):
    src = {"type": "tfds", "name": "alignjax_test_prefs:1.0.0", "split": "train", "data_dir": tfds_dir}
    got = load_records(src)
    assert [r for _, r in got] == RECORDS
    assert got[2][0] == "tfds:alignjax_test_prefs:1.0.0/train:3"

    register_seqio_task("alignjax_test_prefs_task", "alignjax_test_prefs:1.0.0", tfds_data_dir=tfds_dir)
    got = load_records({"type": "seqio", "task": "alignjax_test_prefs_task", "split": "train"})
    assert [r for _, r in got] == RECORDS

    kw = dict(batch_size=4, max_length=10, seed=1, process_index=0, process_count=1)
    a, _ = make_preference_batches(src, "arithmetic", **kw)
    b, _ = make_preference_batches(RECORDS, "arithmetic", **kw)
    for x, y in zip([next(a) for _ in range(3)], [next(b) for _ in range(3)]):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
