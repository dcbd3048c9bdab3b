"""The tokenized on-disk cache and the batched tokenizer: the same examples, batches and statistics
as the in-memory per-row path (the reference), whichever way the work is split or interrupted."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from alignjax.data import DataError, PreferenceData, cache, readers
from alignjax.data.tokenize import ChatTokenizer, tokenize_record, tokenize_rows
from tests.data import tokenizer_zoo

WORDS = "the quick brown fox jumps over lazy dog sea is wide and deep blue capital of France Paris".split()


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    text = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
    out = []
    for i in range(n):
        if i % 3 == 0:  # conversational rows, some multi-turn
            prompt = [{"role": "user", "content": text(int(rng.integers(2, 8)))}]
            out.append(
                dict(
                    prompt=prompt,
                    chosen=[{"role": "assistant", "content": text(int(rng.integers(1, 12)))}],
                    rejected=[{"role": "assistant", "content": text(int(rng.integers(1, 12)))}],
                    margin=float(i) / 7,
                )
            )
        else:
            out.append(
                dict(
                    prompt=text(int(rng.integers(2, 10))),
                    chosen=" " + text(int(rng.integers(1, 12))),
                    rejected=" " + text(int(rng.integers(1, 12))),
                    margin=float(i) / 7,
                )
            )
    return out


def write_jsonl(path, records, bad=True) -> str:
    lines = [json.dumps(r) for r in records]
    if bad:  # a bad row of each kind, a blank line, a duplicate, and no final newline
        lines[5:5] = ["not json", "", json.dumps({"prompt": "a", "chosen": "b"})]
        lines[9:9] = [json.dumps(records[0])]
        reply = [{"role": "assistant", "content": "yes"}]
        odd = {"prompt": [{"role": "bot", "content": "hi"}], "chosen": reply}
        lines.insert(12, json.dumps(dict(odd, rejected=[{"role": "assistant", "content": "no"}])))
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tokenizer_zoo.save("llama3", str(tmp_path_factory.mktemp("tok") / "llama3"))


KW = dict(batch_size=4, max_length=24, max_prompt_length=10, seed=1, on_bad_row="skip", layout="packed")
KW.update(pack_length=48, pack_rows=8)


def batches(data, n=6):
    return [next(data) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def stats_of(data):
    s = data.stats.summary()
    return s, list(data.stats.examples)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
@pytest.mark.parametrize("split", ["all", "train", "eval"])
def test_cache_cold_and_hit_equal_the_in_memory_path(tmp_path, tok_dir, fmt, split):
    path = write_jsonl(tmp_path / "d.jsonl", rows(60))
    good = [r for r in rows(90) if isinstance(r["prompt"], str)]
    good[4] = dict(good[4], chosen="  ")  # a bad row (empty field)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = str(tmp_path / "d.parquet")
        pq.write_table(pa.Table.from_pylist(good), path, row_group_size=7)
    if fmt == "hf":  # a dataset saved by `datasets`, in several Arrow files
        import datasets

        datasets.Dataset.from_list(good).save_to_disk(str(tmp_path / "ds"), num_shards=3)
        path = f"hf:{tmp_path / 'ds'}"
    kw = dict(
        KW, split=split, eval_fraction=0.25 if split != "all" else 0.0, process_count=1, process_index=0
    )
    ref = PreferenceData(path, tok_dir, **kw)
    cold = PreferenceData(path, tok_dir, cache_dir=str(tmp_path / "c"), **kw)
    (key,) = [d for d in os.listdir(tmp_path / "c") if d != "sources"]
    assert os.path.exists(tmp_path / "c" / key / "index.json")
    hit = PreferenceData(path, tok_dir, cache_dir=str(tmp_path / "c"), **kw)
    want = batches(ref)
    assert_same(want, batches(cold))
    assert_same(want, batches(hit))
    assert stats_of(ref)[0]["data/rows_kept"] > 10
    assert stats_of(cold) == stats_of(hit) == stats_of(ref)
    assert [e.where for e in hit.examples] == [e.where for e in ref.examples]
    if fmt == "jsonl" and split == "all":
        s, messages = stats_of(hit)
        assert s["data/duplicates"] == 1 and s["data/skipped/unknown_role"] == 1
        assert messages[0] == f"{path}:6: not valid JSON (Expecting value at column 1)"


@pytest.mark.parametrize("fmt", ["jsonl", "hf"])
def test_simulated_and_real_process_splits_give_the_same_batches(tmp_path, tok_dir, fmt):
    """Two processes (here one standing for both) build two shards; batches equal one process's."""
    path = write_jsonl(tmp_path / "d.jsonl", rows(50))
    if fmt == "hf":
        import datasets

        datasets.Dataset.from_list([r for r in rows(80) if isinstance(r["prompt"], str)]).save_to_disk(
            str(tmp_path / "ds")
        )
        path = f"hf:{tmp_path / 'ds'}"
    one = PreferenceData(
        path, tok_dir, cache_dir=str(tmp_path / "one"), process_count=1, process_index=0, **KW
    )
    one_stats = stats_of(one)
    want = batches(one, 4)
    halves = []
    for p in range(2):
        d = PreferenceData(
            path, tok_dir, cache_dir=str(tmp_path / "two"), process_count=2, process_index=p, **KW
        )
        assert stats_of(d) == one_stats
        halves.append(batches(d, 4))
    (key,) = [d for d in os.listdir(tmp_path / "two") if d != "sources"]
    assert sorted(n for n in os.listdir(tmp_path / "two" / key) if n.startswith("shard")) == [
        "shard-00000-of-00002",
        "shard-00001-of-00002",
    ]
    # Process p's examples are the p-th half of the one-process step (compare prompts+completions).
    ref = PreferenceData(path, tok_dir, process_count=1, process_index=0, **KW)
    for p in range(2):
        ref2 = PreferenceData(path, tok_dir, process_count=2, process_index=p, **KW)
        assert_same(halves[p], batches(ref2, 4))
    assert_same(want, batches(ref, 4))


def test_key_changes_with_tokenizer_template_length_and_data(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "d.jsonl", rows(20))
    tok = ChatTokenizer.from_pretrained(tok_dir)
    base = dict(kind="pairwise", on_bad_row="skip", tokenization="trl", max_length=24)
    key = lambda t, s, src=path: cache.cache_key(cache.source_fingerprint(src, str(tmp_path / "c")), t, s)  # noqa: E731
    k0 = key(tok, base)
    assert key(ChatTokenizer.from_pretrained(tok_dir), dict(base)) == k0  # deterministic
    assert key(tok, dict(base, max_length=25)) != k0
    assert key(tok, dict(base, on_bad_row="error")) != k0
    other_template = ChatTokenizer(tok.tokenizer, chat_template="{{ messages[0]['content'] }}", **tok.special)
    assert key(other_template, base) != k0
    other_tok = ChatTokenizer.from_pretrained(tokenizer_zoo.save("chatml", str(tmp_path / "chatml")))
    assert key(other_tok, base) != k0
    with open(path, "a") as f:
        f.write("\n" + json.dumps(rows(1, seed=5)[0]))
    assert key(tok, base) != k0


def test_loss_columns_survive_the_cache_and_are_in_its_key(tmp_path, tok_dir, monkeypatch):
    """GPO's win probabilities and Sem-DPO's distance: cold and cached batches equal the in-memory
    ones, values included; a cache built before a column was stored is not reused."""
    rng = np.random.default_rng(7)
    recs = [dict(r, chosen_probs_win=float(rng.uniform()), chosen_probs_lose=float(rng.uniform()),
                 semantic_distance=float(rng.uniform(0, 2))) for r in rows(30)]
    path = write_jsonl(tmp_path / "d.jsonl", recs, bad=False)
    kw = dict(KW, process_count=1, process_index=0)
    ref = PreferenceData(path, tok_dir, **kw)
    cold = PreferenceData(path, tok_dir, cache_dir=str(tmp_path / "c"), **kw)
    hit = PreferenceData(path, tok_dir, cache_dir=str(tmp_path / "c"), **kw)
    want = batches(ref, 3)
    for col in ("chosen_probs_win", "chosen_probs_lose", "semantic_distance"):
        assert want[0][col].shape == (4,) and want[0][col].std() > 0
    assert_same(want, batches(cold, 3))
    assert_same(want, batches(hit, 3))
    tok = ChatTokenizer.from_pretrained(tok_dir)
    k0 = cache.cache_key("h", tok, {"kind": "pairwise"})
    monkeypatch.delitem(cache.EXTRA_DTYPES, "semantic_distance")
    assert cache.cache_key("h", tok, {"kind": "pairwise"}) != k0


def test_interrupted_build_leaves_nothing_a_restart_reads(tmp_path, tok_dir, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", rows(30))
    kw = dict(KW, process_count=2, process_index=0, cache_dir=str(tmp_path / "c"))
    real = cache.build_shard
    calls = []

    def dying(source, shard, *a, **k):  # shard 0 gets written, then the process dies in shard 1
        calls.append(shard)
        if shard == 1:
            out = a[2]
            os.makedirs(out)
            open(os.path.join(out, "tokens.bin"), "wb").write(b"\0" * 10)
            raise KeyboardInterrupt
        return real(source, shard, *a, **k)

    monkeypatch.setattr(cache, "build_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        PreferenceData(path, tok_dir, **kw)
    (key,) = [d for d in os.listdir(tmp_path / "c") if d != "sources"]
    assert sorted(os.listdir(tmp_path / "c" / key)) == ["shard-00000-of-00002"]  # no partial shard, no index
    monkeypatch.setattr(cache, "build_shard", real)
    calls.clear()
    restarted = PreferenceData(path, tok_dir, **kw)
    assert_same(batches(restarted, 3), batches(PreferenceData(path, tok_dir, **dict(kw, cache_dir=None)), 3))


def test_on_bad_row_error_names_the_first_bad_line_from_any_shard(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "d.jsonl", rows(40), bad=False)
    lines = open(path).read().split("\n")
    lines[30] = "oops"
    open(path, "w").write("\n".join(lines))
    for p_count in (1, 2, 3):
        kw = dict(KW, batch_size=6, on_bad_row="error", process_count=p_count, process_index=0)
        with pytest.raises(DataError, match=rf"^{path}:31: not valid JSON"):
            PreferenceData(path, tok_dir, cache_dir=str(tmp_path / f"c{p_count}"), **kw)
        with pytest.raises(DataError, match=rf"^{path}:31: not valid JSON"):  # read from the cache
            PreferenceData(path, tok_dir, cache_dir=str(tmp_path / f"c{p_count}"), **kw)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_jsonl_byte_ranges_cover_every_line_once(tmp_path, num_shards):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n\xff\n{"a": 3}\n\n\n{"a": 4}')
    whole = list(readers.read_jsonl(str(path)))
    got, base = [], 0
    for s in range(num_shards):
        share = list(readers.jsonl_share(str(path), s, num_shards))
        got += [(f"{path}:{base + line}", row) for line, row in share if row is not None]
        base += share[-1][0] if share else 0
    assert [w for w, _ in got] == [w for w, _ in whole]
    assert [r if isinstance(r, dict) else r.reason for _, r in got] == [
        r if isinstance(r, dict) else r.reason for _, r in whole
    ]


def test_batched_tokenization_equals_the_per_row_path(tmp_path):
    """Every zoo tokenizer; rows that fail (a character outside a char vocabulary) fail alike."""
    from alignjax.data import synthetic

    recs = rows(40, seed=3)
    for name in tokenizer_zoo.NAMES:
        tok = ChatTokenizer.from_pretrained(tokenizer_zoo.save(name, str(tmp_path / name)))
        for opts in ({}, dict(max_length=12, truncation_mode="keep_end"), dict(tokenization="joint")):
            got = tokenize_rows(recs, [str(i) for i in range(len(recs))], tok, **opts)
            for i, (rec, row) in enumerate(zip(recs, got)):
                try:
                    want = tokenize_record(rec, tok, where=str(i), **opts)
                except DataError as e:
                    assert isinstance(row.result, DataError) and str(row.result) == str(e)
                    continue
                assert (row.result.prompt, row.result.completions) == (want.prompt, want.completions)
    char = synthetic.arithmetic_tokenizer()
    arith = [
        {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
        {"prompt": "x+2=", "chosen": "3", "rejected": "4"},
    ]
    got = tokenize_rows(arith, ["a:1", "a:2"], char)
    assert got[0].result.completions == tokenize_record(arith[0], char).completions
    with pytest.raises(DataError) as e:
        tokenize_record(arith[1], char, where="a:2")
    assert str(got[1].result) == str(e.value) and str(e.value).startswith("a:2: cannot tokenize")


# ---- issue 15's data checks


def test_unknown_role_names_file_line_and_roles_before_any_template(tmp_path):
    permissive = ChatTokenizer.from_pretrained(tokenizer_zoo.save("chatml", str(tmp_path / "tok")))
    path = tmp_path / "d.jsonl"
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}]}
    good["rejected"] = [{"role": "assistant", "content": "b"}]
    bad = dict(good, chosen=[{"role": "robot", "content": "a"}])
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        PreferenceData(str(path), permissive, batch_size=1, process_count=1, process_index=0)
    assert str(e.value) == (
        f"{path}:2: field 'chosen' message 0 has role 'robot'; allowed roles: system, developer, user, "
        "assistant, tool"
    )
    data = PreferenceData(
        str(path), permissive, batch_size=1, on_bad_row="skip", process_count=1, process_index=0
    )
    assert data.stats.summary()["data/skipped/unknown_role"] == 1 and data.stats.rows_kept == 1


@pytest.mark.parametrize("cached", [False, True])
def test_empty_file_is_named(tmp_path, tok_dir, cached):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    kw = dict(batch_size=2, process_count=1, process_index=0, on_bad_row="skip")
    with pytest.raises(DataError, match=rf"^{path}: the file has no data rows$"):
        PreferenceData(str(path), tok_dir, cache_dir=str(tmp_path / "c") if cached else None, **kw)


@pytest.mark.parametrize("cached", [False, True])
def test_identical_after_truncation_is_counted_and_skipped(tmp_path, tok_dir, cached):
    recs = [dict(prompt="the sea is", chosen=" wide and deep", rejected=" wide and blue") for _ in range(3)]
    recs += [dict(prompt="the fox", chosen=" jumps", rejected=" is lazy")] * 2
    path = write_jsonl(tmp_path / "d.jsonl", recs, bad=False)
    tok = ChatTokenizer.from_pretrained(tok_dir)
    room = len(tok.encode("the sea is wide and", add_special_tokens=True))
    kw = dict(batch_size=2, max_length=room, process_count=1, process_index=0, on_bad_row="error")
    data = PreferenceData(path, tok_dir, cache_dir=str(tmp_path / "c") if cached else None, **kw)
    s = data.stats.summary()
    assert s["data/identical_after_truncation"] == 3 and s["data/rows_kept"] == 2
    assert s["data/duplicates"] == 3  # two repeats of the first row, one of the fourth


def test_missing_tokenizer_directory_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        ChatTokenizer.from_pretrained(str(tmp_path / "nope"))
    assert str(e.value) == (
        f"data.tokenizer={tmp_path / 'nope'}: no such tokenizer directory (give a built-in name or a "
        "directory with tokenizer.json)"
    )
