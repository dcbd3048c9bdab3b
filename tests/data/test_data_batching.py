"""Layouts: exact arrays on a tiny batch; padded, packed and shared-prompt hold the same sequences."""

import numpy as np
import pytest

from alignjax.data import DataStats, TokenizedExample, make_batch, padded_batch, padding_fraction

PAD = 0
EXAMPLES = [
    TokenizedExample([5, 6, 7], [[8, 2], [9, 9, 2]], {"margin": 0.5, "label": True}, "a:1"),
    TokenizedExample([10], [[11, 12, 13, 2], [2]], {"margin": -1.0, "label": False}, "a:2"),
    TokenizedExample([14, 15], [[16, 2], [17, 18, 2]], {"margin": 2.0, "label": True}, "a:3"),
]


def per_sequence(batch, n_seq):
    """Independent reader: for each sequence id, (tokens, loss_mask, positions) in row order."""
    out = {}
    for s in range(n_seq):
        sel = batch["example_ids"] == s
        out[s] = (
            batch["input_ids"][sel].tolist(),
            batch["loss_mask"][sel].tolist(),
            batch["positions"][sel].tolist(),
        )
    return out


def expected_sequences(examples):
    seqs = {}
    b = len(examples)
    for k in range(2):
        for i, ex in enumerate(examples):
            ids = ex.prompt + ex.completions[k]
            mask = [0.0] * len(ex.prompt) + [1.0] * len(ex.completions[k])
            seqs[k * b + i] = (ids, mask, list(range(len(ids))))
    return seqs


def test_padded_exact():
    batch = make_batch(EXAMPLES, "padded", pad_id=PAD, buckets=(4, 8, 16))
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 2, 0, 0, 0],
        [10, 11, 12, 13, 2, 0, 0, 0],
        [14, 15, 16, 2, 0, 0, 0, 0],
        [5, 6, 7, 9, 9, 2, 0, 0],
        [10, 2, 0, 0, 0, 0, 0, 0],
        [14, 15, 17, 18, 2, 0, 0, 0],
    ]
    assert batch["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert batch["loss_mask"][4].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert batch["segment_ids"][2].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert batch["positions"][3].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]
    assert batch["example_ids"][:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert batch["example_ids"][4].tolist() == [4, 4, -1, -1, -1, -1, -1, -1]
    assert batch["chosen_lengths"].tolist() == [2, 4, 2] and batch["rejected_lengths"].tolist() == [3, 1, 3]
    assert batch["margin"].dtype == np.float32 and batch["margin"].tolist() == [0.5, -1.0, 2.0]
    assert batch["label"].tolist() == [True, False, True]
    assert padding_fraction(batch) == pytest.approx(1 - 27 / 48)
    # Bucketing: the longest sequence (6) goes to bucket 8; without buckets pad to max_length.
    assert padded_batch(EXAMPLES, pad_id=PAD, max_length=12)["input_ids"].shape == (6, 12)


def test_packed_exact_and_same_sequences_as_padded():
    stats = DataStats()
    packed = make_batch(EXAMPLES, "packed", pad_id=PAD, pack_length=10, pack_rows=3, stats=stats)
    # First fit in sequence order: lengths 5,5,4,6,2,5 -> rows [0,1], [2,3], [4,5].
    assert packed["input_ids"].tolist() == [
        [5, 6, 7, 8, 2, 10, 11, 12, 13, 2],
        [14, 15, 16, 2, 5, 6, 7, 9, 9, 2],
        [10, 2, 14, 15, 17, 18, 2, 0, 0, 0],
    ]
    assert packed["segment_ids"].tolist() == [
        [1] * 5 + [2] * 5,
        [1] * 4 + [2] * 6,
        [1, 1, 2, 2, 2, 2, 2, 0, 0, 0],
    ]
    assert packed["positions"][2].tolist() == [0, 1, 0, 1, 2, 3, 4, 0, 0, 0]
    assert packed["loss_mask"][2].tolist() == [0, 1, 0, 0, 1, 1, 1, 0, 0, 0]
    assert stats.padding_fraction == pytest.approx(3 / 30)
    padded = make_batch(EXAMPLES, "padded", pad_id=PAD)
    assert per_sequence(packed, 6) == per_sequence(padded, 6) == expected_sequences(EXAMPLES)
    with pytest.raises(ValueError, match="needs 3 rows but data.pack_rows=2"):
        make_batch(EXAMPLES, "packed", pad_id=PAD, pack_length=10, pack_rows=2)


def test_shared_prompt_exact_and_same_sequences():
    batch = make_batch(EXAMPLES, "shared_prompt", pad_id=PAD, buckets=(16,))
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 2, 7, 9, 9, 2] + [0] * 7
    assert batch["branch_ids"][0].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2] + [0] * 7
    assert batch["positions"][0].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5] + [0] * 7
    assert batch["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 1, 1, 1] + [0] * 7
    assert batch["example_ids"][0].tolist() == [0, 0, 0, 0, 0, 3, 3, 3, 3] + [-1] * 7
    assert batch["segment_ids"][0].tolist() == [1] * 9 + [0] * 7
    # One-token prompt: branch 0 is empty, each branch starts with the copied prompt token.
    assert batch["input_ids"][1, :8].tolist() == [10, 11, 12, 13, 2, 10, 2, 0]
    assert batch["positions"][1, :7].tolist() == [0, 1, 2, 3, 4, 0, 1]
    # Per sequence: chosen = branch 0 + branch 1 of row i; rejected = branch 0 + branch 2.
    expected = expected_sequences(EXAMPLES)
    b = len(EXAMPLES)
    for i in range(b):
        row = {k: v[i] for k, v in batch.items() if np.ndim(v) == 2}
        for branch, seq in ((1, i), (2, b + i)):
            sel = ((row["branch_ids"] == 0) | (row["branch_ids"] == branch)) & (row["segment_ids"] > 0)
            ids, mask, pos = (
                row["input_ids"][sel].tolist(),
                row["loss_mask"][sel].tolist(),
                row["positions"][sel],
            )
            assert ids == expected[seq][0] and mask == expected[seq][1] and pos.tolist() == expected[seq][2]
    assert batch["chosen_lengths"].tolist() == [2, 4, 2]


def test_listwise_and_unpaired_sequence_order():
    exs = [
        TokenizedExample([3], [[4, 2], [5, 2], [6, 2]], {"scores": [1.0, 2.0, 0.0]}),
        TokenizedExample([7], [[8, 2], [9, 2], [2]], {"scores": [0.0, 0.0, 1.0]}),
    ]
    batch = make_batch(exs, "padded", pad_id=PAD)
    assert batch["input_ids"][:, 1].tolist() == [4, 8, 5, 9, 6, 2]  # candidate-major: k*B + i
    assert batch["scores"].shape == (2, 3) and batch["lengths"].tolist() == [[2, 2, 2], [2, 2, 1]]
    un = make_batch([TokenizedExample([3], [[4, 2]], {"label": False})], "padded", pad_id=PAD)
    assert un["lengths"].tolist() == [2] and un["label"].tolist() == [False]
    with pytest.raises(ValueError, match="field 'margin' is present on some rows but missing at b:2"):
        make_batch(
            [
                TokenizedExample([3], [[4], [5]], {"margin": 1.0}, "b:1"),
                TokenizedExample([3], [[4], [6]], {}, "b:2"),
            ],
            "padded",
            pad_id=PAD,
        )
