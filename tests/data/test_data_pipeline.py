"""Iterator: exact resume from state, disjoint process shards covering the epoch, global arrays on a mesh."""

import json

import numpy as np
import pytest

from alignjax.data import PreferenceData, make_preference_batches, synthetic

RECORDS = synthetic.arithmetic_dpo_records(synthetic.arithmetic_splits(0)["train"][:28])
TOK = synthetic.arithmetic_tokenizer()


def _data(**kw):
    args = dict(batch_size=4, max_length=10, seed=3, process_index=0, process_count=1)
    args.update(kw)
    return PreferenceData(RECORDS, TOK, **args)


def _prompts(batch, b):
    return [TOK.decode(row[:6]) for row in batch["input_ids"][:b]]


def test_resume_gives_the_same_batches():
    data = _data()
    assert data.steps_per_epoch == 7
    for _ in range(5):
        next(data)
    state = json.loads(json.dumps(data.get_state()))  # the state survives a JSON checkpoint
    assert state == {"epoch": 0, "position": 5}
    after = [next(data) for _ in range(3)]  # crosses into epoch 1
    fresh = _data()
    fresh.set_state(state)
    for a, b in zip(after, [next(fresh) for _ in range(3)]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert fresh.get_state() == {"epoch": 1, "position": 1}


def test_epoch_order_is_seeded_and_changes_per_epoch():
    data = _data()
    e0, e1 = data.epoch_order(0), data.epoch_order(1)
    np.testing.assert_array_equal(e0, np.random.default_rng([3, 0]).permutation(28))
    assert sorted(e0) == sorted(e1) == list(range(28)) and not np.array_equal(e0, e1)
    unshuffled = _data(shuffle=False)
    assert _prompts(next(unshuffled), 4) == [r["prompt"] for r in RECORDS[:4]]


def test_two_processes_disjoint_shards_cover_the_epoch():
    seen = []
    for p in range(2):
        data = _data(process_index=p, process_count=2, num_epochs=1)
        prompts = [pr for batch in data for pr in _prompts(batch, 2)]
        assert len(prompts) == 14
        seen.append(prompts)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(r["prompt"] for r in RECORDS)
    # Host p's rows are the p-th half of the single-process global batch.
    single = next(_data())
    assert _prompts(single, 4) == [seen[0][0], seen[0][1], seen[1][0], seen[1][1]]


def test_skip_bad_rows_and_prompt_budget(tmp_path):
    path = tmp_path / "d.jsonl"
    long_prompt = json.dumps({"prompt": "1234567890=", "chosen": "1", "rejected": "2"})  # 11 tokens
    rows = [json.dumps(r) for r in RECORDS[:8]] + [
        "oops",
        json.dumps({"prompt": "12+34=", "chosen": "1"}),
        json.dumps({"prompt": "12+34=", "chosen": "1", "rejected": "2"}),
        long_prompt,
    ]
    path.write_text("\n".join(rows) + "\n")
    kw = dict(batch_size=3, max_length=10, process_count=1, process_index=0)
    with pytest.raises(ValueError, match=rf"^{path}:9: not valid JSON"):
        make_preference_batches(str(path), "arithmetic", **kw)
    with pytest.raises(ValueError) as e:
        make_preference_batches([json.loads(long_prompt)], "arithmetic", **kw)
    assert str(e.value) == (
        "<records>:1: prompt has 11 tokens, leaving no room for a completion within "
        "data.max_length=10; set data.max_prompt_length to cut the prompt"
    )
    data, stats = make_preference_batches(str(path), "arithmetic", on_bad_row="skip", **kw)
    assert (stats.rows_read, stats.rows_kept, data.steps_per_epoch) == (12, 9, 3)
    assert dict(stats.skipped) == {"not_json": 1, "missing_field": 1, "prompt_too_long": 1}
    assert stats.examples[-1].startswith(f"{path}:12: prompt has 11 tokens")
    # With a prompt budget the long prompt is kept, cut to its last 4 tokens ("890=").
    data, stats = make_preference_batches(
        str(path), "arithmetic", on_bad_row="skip", max_prompt_length=6, **kw
    )
    assert stats.rows_kept == 10 and stats.truncated_prompts == 1
    assert data.examples[-1].prompt == TOK.encode("567890=")[-6:] == TOK.encode("67890=")


def test_make_preference_batches_global_batch_on_mesh():
    from alignjax.sharding import global_batch, make_mesh

    data, stats = make_preference_batches(
        RECORDS,
        "arithmetic",
        layout="packed",
        batch_size=8,
        max_length=10,
        pack_length=20,
        pack_rows=8,
        seed=0,
        process_count=1,
        process_index=0,
    )
    host = next(data)
    assert host["input_ids"].shape == (8, 20) and host["chosen_lengths"].shape == (8,)
    assert stats.padding_fraction == 0.0  # 16 sequences of 10 tokens fill 8 rows of 20 exactly
    mesh = make_mesh({"data": -1, "fsdp": 2})
    arrays = global_batch(mesh, host)
    for k, v in host.items():
        np.testing.assert_array_equal(np.asarray(arrays[k]), v)
    assert arrays["input_ids"].sharding.spec[0] == ("data", "fsdp")


def test_pairs_read_as_unpaired_split_like_trl():
    """kind=unpaired on preference pairs (experiments/kto.py on the arithmetic pairs) unpairs them as
    TRL's unpair_preference_dataset does."""
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    from alignjax.data import load_records

    pairs = RECORDS[:4]
    ours = [rec for _, rec in load_records(pairs, "unpaired")]
    theirs = list(unpair_preference_dataset(Dataset.from_list(pairs)))
    key = lambda r: (r["prompt"], r["completion"], r["label"])  # noqa: E731
    assert sorted(map(key, ours)) == sorted(map(key, theirs))
    data, stats = make_preference_batches(
        pairs, "arithmetic", kind="unpaired", batch_size=8, max_length=10, process_count=1, process_index=0
    )
    assert (stats.rows_read, stats.rows_kept) == (4, 8)
    assert sorted(next(data)["label"].tolist()) == [False] * 4 + [True] * 4


def test_holdout_split_is_disjoint_and_fixed():
    from alignjax.data.pipeline import eval_plan, holdout_split

    rows = list(range(40))
    held = holdout_split(rows, 0.25, "eval")
    train = holdout_split(rows, 0.25, "train")
    assert len(held) == 10 and sorted(held + train) == rows
    assert held == holdout_split(list(range(40)), 0.25, "eval")  # the same rows every run
    with pytest.raises(ValueError, match=r"data.eval_fraction must be in \(0, 1\)"):
        holdout_split(rows, 1.0, "eval")
    # A user's data is never evaluated on the built-in arithmetic pairs.
    assert eval_plan("synthetic:arithmetic_dpo:train", "synthetic:arithmetic_dpo:val", 0.0) == (
        "synthetic:arithmetic_dpo:val",
        "all",
    )
    assert eval_plan("/data/pairs.jsonl", "synthetic:arithmetic_dpo:val", 0.0) is None
    held_out = eval_plan("/data/pairs.jsonl", "synthetic:arithmetic_dpo:val", 0.1)
    assert held_out == ("/data/pairs.jsonl", "eval")
    assert eval_plan("/data/pairs.jsonl", "/data/held.jsonl", 0.1) == ("/data/held.jsonl", "all")


def test_train_and_eval_splits_of_one_source_do_not_overlap():
    kw = dict(batch_size=2, max_length=10, process_count=1, process_index=0, eval_fraction=0.25)
    train, _ = make_preference_batches(RECORDS, "arithmetic", split="train", **kw)
    held, _ = make_preference_batches(RECORDS, "arithmetic", split="eval", **kw)
    as_set = lambda d: {tuple(ex.prompt + ex.completions[0]) for ex in d.examples}  # noqa: E731
    assert len(train.examples) + len(held.examples) == len(RECORDS)
    assert not as_set(train) & as_set(held)


def test_pad_to_multiple_of_rounds_rows_up():
    kw = dict(batch_size=4, max_length=10, process_count=1, process_index=0)
    plain, _ = make_preference_batches(RECORDS, "arithmetic", **kw)
    padded, _ = make_preference_batches(RECORDS, "arithmetic", pad_to_multiple_of=8, **kw)
    a, b = next(plain), next(padded)
    assert a["input_ids"].shape[1] == 10 and b["input_ids"].shape[1] == 16
    for key in ("input_ids", "loss_mask", "segment_ids", "positions", "example_ids"):
        assert (b[key][:, :10] == a[key]).all()
    assert (b["segment_ids"][:, 10:] == 0).all() and (b["loss_mask"][:, 10:] == 0).all()
