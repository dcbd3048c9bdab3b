"""Built-in tasks: split sizes and disjointness, the SFT bad habit, DPO pair kinds, verifiers, tokenizers."""

import json

import numpy as np
import pytest

from alignjax.data import ChatTokenizer, DataError, synthetic


@pytest.fixture(scope="module")
def splits():
    return synthetic.arithmetic_splits(0)


def _ref_sum(prompt):  # independent parser: "ab+cd=" -> int
    return int(prompt[0:2]) + int(prompt[3:5])


def test_splits_disjoint_and_complete(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 7500, "val": 500, "test": 2000}
    allp = splits["train"] + splits["val"] + splits["test"]
    assert len(set(allp)) == 10000
    n_carry = sum((x % 10 + y % 10) >= 10 for x, y in splits["test"])
    assert n_carry == sum(synthetic.needs_carry(x, y) for x, y in splits["test"]) and 850 < n_carry < 970


def test_answers_and_verifier():
    assert synthetic.arithmetic_answer(18, 25) == "340"
    assert synthetic.carry_dropped_answer(18, 25) == "330"
    assert synthetic.spurious_carry_answer(12, 34) == "650"
    assert synthetic.arithmetic_answer(99, 99) == "891"
    assert synthetic.arithmetic_verify("18+25=", "340") and synthetic.arithmetic_verify("18+25=", "340<eos>")
    assert not synthetic.arithmetic_verify("18+25=", "330") and not synthetic.arithmetic_verify(
        "18+25=", "34"
    )


def test_sft_bad_habit(splits):
    recs = synthetic.arithmetic_sft_records(splits["train"], drop_rate=0.8, seed=0)
    carry = [r for r in recs if (int(r["prompt"][1]) + int(r["prompt"][4])) >= 10]
    nocarry = [r for r in recs if (int(r["prompt"][1]) + int(r["prompt"][4])) < 10]
    assert all(int(r["completion"][::-1]) == _ref_sum(r["prompt"]) for r in nocarry)
    dropped = [int(r["completion"][::-1]) == _ref_sum(r["prompt"]) - 10 for r in carry]
    correct = [int(r["completion"][::-1]) == _ref_sum(r["prompt"]) for r in carry]
    assert all(d != c for d, c in zip(dropped, correct))  # each carry target is one or the other
    assert 0.77 < np.mean(dropped) < 0.83


def test_dpo_pairs_cover_both_kinds(splits):
    recs = synthetic.arithmetic_dpo_records(splits["train"])
    assert len(recs) == 7500
    kinds = {"carry": 0, "nocarry": 0}
    for r in recs:
        s = _ref_sum(r["prompt"])
        assert int(r["chosen"][::-1]) == s and synthetic.arithmetic_verify(r["prompt"], r["chosen"])
        assert not synthetic.arithmetic_verify(r["prompt"], r["rejected"])
        carry = int(r["prompt"][1]) + int(r["prompt"][4]) >= 10
        assert int(r["rejected"][::-1]) == (s - 10 if carry else s + 10)
        kinds["carry" if carry else "nocarry"] += 1
    assert kinds["carry"] > 3000 and kinds["nocarry"] > 3000


def test_char_tokenizer_exact_and_matches_transformers(tmp_path):
    tok = synthetic.arithmetic_tokenizer()
    assert tok.vocab_size == 15 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    from alignjax.data import tokenize_record

    ex = tokenize_record({"prompt": "18+25=", "chosen": "340", "rejected": "330"}, tok)
    assert ex.prompt == [4, 11, 13, 5, 8, 14] and ex.completions == [[6, 7, 3, 2], [6, 6, 3, 2]]
    tok.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<bos>", "<eos>", "<pad>")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf("18+25=340<eos>")["input_ids"] == [4, 11, 13, 5, 8, 14, 6, 7, 3, 2]
    assert ChatTokenizer.from_pretrained(str(tmp_path)).encode("07+45=") == [3, 10, 13, 7, 8, 14]
    assert tok.decode([4, 11, 13, 5, 8, 14, 6, 7, 3, 2]) == "18+25=340"


def test_multistep_task():
    steps = synthetic.multistep_steps(85, 63, 51)
    assert steps == ["85+63=148\n", "148+51=199\n", "answer 199"]
    assert synthetic.split_steps("".join(steps)) == steps
    assert synthetic.multistep_verify("85+63+51=", "".join(steps))
    assert not synthetic.multistep_verify("85+63+51=", "85+63=148\n148+51=198\nanswer 198")
    assert not synthetic.multistep_verify("85+63+51=", "85+63=148\n")  # no final answer
    sp = synthetic.multistep_splits(0)
    assert not (set(sp["train"]) & set(sp["test"])) and len(sp["train"]) == 2000
    pairs = synthetic.multistep_pair_records(sp["val"][:50], seed=1)
    tok = synthetic.multistep_tokenizer()
    for r in pairs:
        assert synthetic.multistep_verify(r["prompt"], r["chosen"])
        assert not synthetic.multistep_verify(r["prompt"], r["rejected"])
        assert tok.decode(tok.encode(r["rejected"])) == r["rejected"]  # every character is in the vocabulary


def test_gsm8k_reader_and_verifier(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(
        json.dumps({"question": "How many?", "answer": "3 + 4 = 7\n#### 1,234"})
        + "\n"
        + json.dumps({"question": "Q", "answer": "no final"})
        + "\n"
    )
    with pytest.raises(DataError) as e:
        synthetic.read_gsm8k(str(path))
    assert str(e.value) == f"{path}:2: field 'answer' has no final answer after '####'"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    (rec,) = synthetic.read_gsm8k(str(path))
    assert rec == {"prompt": "How many?", "completion": "3 + 4 = 7\n#### 1,234", "final": "1234"}
    assert synthetic.gsm8k_verify("so the answer is\n#### 1234", "1234")
    assert synthetic.gsm8k_verify("it is 1,234.", "1234")
    assert not synthetic.gsm8k_verify("#### 1233", "1234")


def test_builtin_source_names():
    assert (
        synthetic.records("arithmetic_dpo", "val")[0]
        == synthetic.arithmetic_dpo_records(synthetic.arithmetic_splits(0)["val"][:1])[0]
    )
    with pytest.raises(ValueError, match="unknown synthetic task 'nope'"):
        synthetic.records("nope")
