"""Schema validation and readers: exact error messages (file:line), skip counts, Parquet = JSONL."""

import json
import re

import pytest

from alignjax.data import DataError, DataStats, load_records, validate_record

GOOD = {"prompt": "what is 2+2", "chosen": "4", "rejected": "5"}


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def bad_file(tmp_path):
    return _write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            json.dumps(GOOD),  # 1 ok
            "{not json",  # 2
            json.dumps({"prompt": "p", "chosen": "a"}),  # 3 missing rejected
            "",  # 4 blank: ignored
            json.dumps({"prompt": "p", "chosen": "  ", "rejected": "b"}),  # 5 empty
            json.dumps({"prompt": "p", "chosen": 5, "rejected": "b"}),  # 6 wrong type
            json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),  # 7 identical
            json.dumps({**GOOD, "margin": 1.5, "user_id": 3}),  # 8 ok
        ],
    )


@pytest.mark.parametrize(
    "line,message",
    [
        (2, "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
        (3, "missing field 'rejected'"),
        (5, "field 'chosen' is empty"),
        (6, "field 'chosen' must be a string or a list of chat messages, got int"),
        (7, "chosen is identical to rejected"),
    ],
)
def test_error_names_file_and_line(tmp_path, line, message):
    path = str(tmp_path / "one.jsonl")
    src = {
        2: "{not json",
        3: json.dumps({"prompt": "p", "chosen": "a"}),
        5: json.dumps({"prompt": "p", "chosen": "  ", "rejected": "b"}),
        6: json.dumps({"prompt": "p", "chosen": 5, "rejected": "b"}),
        7: json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
    }[line]
    _write_jsonl(tmp_path / "one.jsonl", [json.dumps(GOOD)] * (line - 1) + [src])
    with pytest.raises(DataError) as e:
        load_records(path, "pairwise", on_bad_row="error")
    assert str(e.value) == f"{path}:{line}: {message}"


def test_skip_counts_every_bad_row_by_reason(bad_file):
    stats = DataStats()
    recs = load_records(bad_file, "pairwise", on_bad_row="skip", stats=stats)
    assert [w for w, _ in recs] == [f"{bad_file}:1", f"{bad_file}:8"]
    assert recs[1][1] == {**GOOD, "margin": 1.5, "user_id": 3}
    assert stats.rows_read == 7 and stats.rows_skipped == 5
    assert dict(stats.skipped) == {
        "not_json": 1,
        "missing_field": 1,
        "empty_field": 1,
        "wrong_type": 1,
        "chosen_equals_rejected": 1,
    }
    assert stats.examples[1] == f"{bad_file}:3: missing field 'rejected'"
    assert stats.summary()["data/skipped/not_json"] == 1


def test_implicit_prompt_is_common_prefix():
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rej = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye"}]
    rec = validate_record({"chosen": conv, "rejected": rej}, "pairwise", "f:1")
    assert rec == {"prompt": conv[:1], "chosen": conv[1:], "rejected": rej[1:]}


def test_kinds_and_extras():
    assert (
        validate_record({"prompt": "p", "completion": "c", "label": True}, "unpaired", "f:1")["label"] is True
    )
    with pytest.raises(DataError, match=r"^f:4: field 'label' must be a bool, got int$"):
        validate_record({"prompt": "p", "completion": "c", "label": 1}, "unpaired", "f:4")
    rec = validate_record(
        {"prompt": "p", "candidates": ["a", "b", "c"], "scores": [1, 0, 2]}, "listwise", "f:1"
    )
    assert rec["scores"] == [1.0, 0.0, 2.0]
    with pytest.raises(DataError, match=r"^f:2: field 'scores' has 2 entries but 'candidates' has 3$"):
        validate_record({"prompt": "p", "candidates": ["a", "b", "c"], "scores": [1, 0]}, "listwise", "f:2")
    rec = validate_record(
        {**GOOD, "chosen_visits": 7, "rejected_visits": 2, "source_logps": [-1.0, -2.5], "rationale": "why"},
        "step",
        "f:1",
    )
    assert (rec["chosen_visits"], rec["rejected_visits"]) == (7.0, 2.0)
    assert (rec["source_chosen_logps"], rec["source_rejected_logps"]) == ([-1.0], [-2.5])
    assert rec["rationale"] == "why"
    two_sources = {"chosen": [-1, -2], "rejected": [-3, -4]}
    two = validate_record({**GOOD, "source_logps": two_sources}, "pairwise", "f:1")
    assert (two["source_chosen_logps"], two["source_rejected_logps"]) == ([-1.0, -2.0], [-3.0, -4.0])
    with pytest.raises(DataError, match=r"^f:3: field 'source_logps' has 2 chosen but 1 rejected values"):
        validate_record({**GOOD, "source_logps": [[-1, -2], -3]}, "pairwise", "f:3")
    with pytest.raises(DataError, match=r"^f:4: field 'source_logps.chosen\[1\]' must be a number"):
        validate_record({**GOOD, "source_logps": [[-1, "x"], [-3, -4]]}, "pairwise", "f:4")
    with pytest.raises(DataError, match=r"^f:3: missing field 'chosen_visits'$"):
        validate_record(GOOD, "step", "f:3")


def test_win_probabilities_and_semantic_distance_are_checked():
    cols = {"chosen_probs_win": 0.9, "chosen_probs_lose": 0.7, "semantic_distance": 0.25}
    rec = validate_record({**GOOD, **cols}, "pairwise", "f:1")
    assert {k: rec[k] for k in cols} == cols  # P_w + P_l need not be 1
    ends = validate_record({**GOOD, "chosen_probs_win": 0, "chosen_probs_lose": 1}, "pairwise", "f:1")
    assert (ends["chosen_probs_win"], ends["chosen_probs_lose"]) == (0.0, 1.0)
    prob, dist = "must be a probability in [0, 1], got", "must be a finite distance >= 0, got"
    bad = [
        ({"chosen_probs_win": 1.01}, f"field 'chosen_probs_win' {prob} 1.01"),
        ({"chosen_probs_lose": -0.2}, f"field 'chosen_probs_lose' {prob} -0.2"),
        ({"chosen_probs_win": float("nan")}, f"field 'chosen_probs_win' {prob} nan"),
        ({"chosen_probs_win": True}, "field 'chosen_probs_win' must be a number, got bool"),
        ({"semantic_distance": "far"}, "field 'semantic_distance' must be a number, got str"),
        ({"semantic_distance": -1e-3}, f"field 'semantic_distance' {dist} -0.001"),
        ({"semantic_distance": float("inf")}, f"field 'semantic_distance' {dist} inf"),
    ]
    for extra, problem in bad:
        with pytest.raises(DataError, match="^" + re.escape(f"f:7: {problem}") + "$"):
            validate_record({**GOOD, **extra}, "pairwise", "f:7")


def test_parquet_matches_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        GOOD,
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "bye"}],
        },
    ]
    jpath = _write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in rows[1:]])
    ppath = str(tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), ppath)
    assert [r for _, r in load_records(ppath)] == [r for _, r in load_records(jpath)] == rows[1:]
    assert load_records(ppath)[0][0] == f"{ppath}:1"


def test_append_eos_false_keeps_partial_completions_as_written():
    from alignjax.data import synthetic, tokenize_record

    tok = synthetic.multistep_tokenizer()
    row = {"prompt": "1+2+3=", "chosen": "1+2=3\n", "rejected": "answer 6<eos>"}
    step = tokenize_record(validate_record(dict(row, append_eos=False), "pairwise", "f:1"), tok)
    full = tokenize_record(validate_record(row, "pairwise", "f:2"), tok)
    intermediate = tok.encode("1+2=3\n", add_special_tokens=False)
    assert step.completions[0] == intermediate  # no EOS after an intermediate step
    assert full.completions[0] == intermediate + [tok.eos_id]
    assert step.completions[1] == full.completions[1] and step.completions[1][-1] == tok.eos_id
    assert step.completions[1].count(tok.eos_id) == 1
    with pytest.raises(DataError, match="f:3: field 'append_eos' must be true or false"):
        validate_record(dict(row, append_eos="no"), "pairwise", "f:3")


def test_invalid_utf8_is_a_bad_row_with_its_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(GOOD).encode()
    bad = b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}'
    path.write_bytes(b"\n".join([good, bad, good]) + b"\n")
    with pytest.raises(DataError) as e:
        load_records(str(path), "pairwise", on_bad_row="error")
    assert str(e.value) == f"{path}:2: invalid UTF-8 at byte 12"
    stats = DataStats()
    recs = load_records(str(path), "pairwise", on_bad_row="skip", stats=stats)
    assert [w for w, _ in recs] == [f"{path}:1", f"{path}:3"]
    assert dict(stats.skipped) == {"invalid_utf8": 1}
