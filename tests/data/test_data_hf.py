"""``data.source = "hf:<dataset>[:split]"``: Hugging Face datasets, TRL's columns, the same examples
as the same rows in JSONL. Datasets are written here with ``save_to_disk`` / as data files."""

import json

import pytest

from alignjax.data import DataError, DataStats, load_records
from alignjax.data.pipeline import tokenize_all
from alignjax.data.readers import parse_hf_source
from tests.data import tokenizer_zoo


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


TABLES = {
    "pairwise_standard": (
        "pairwise",
        [
            {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " The sea."},
            {"prompt": "How many legs does a spider have? ", "chosen": "Eight.", "rejected": "Six."},
        ],
    ),
    "pairwise_conversational": (
        "pairwise",
        [
            {
                "prompt": [user("Is the sea blue?")],
                "chosen": [assistant("yes")],
                "rejected": [assistant("no")],
            },
            {
                "prompt": [user("Is the sea blue?"), assistant("yes"), user("Deep?")],
                "chosen": [assistant("yes, deep")],
                "rejected": [assistant("no")],
            },
        ],
    ),
    # Implicit prompt: chosen/rejected are whole conversations sharing their first turns.
    "pairwise_implicit": (
        "pairwise",
        [
            {
                "chosen": [user("Explain gradient descent."), assistant("It follows the gradient.")],
                "rejected": [user("Explain gradient descent."), assistant("No.")],
            }
        ],
    ),
    "unpaired": (
        "unpaired",
        [
            {"prompt": "What is the capital of France?", "completion": " Paris.", "label": True},
            {"prompt": "What is the capital of France?", "completion": " Blue.", "label": False},
        ],
    ),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from alignjax.data import ChatTokenizer

    return ChatTokenizer.from_pretrained(tokenizer_zoo.save("chatml", str(tmp_path_factory.mktemp("tok"))))


def _examples(source, kind, tok):
    ex, _ = tokenize_all(load_records(source, kind), tok, on_bad_row="error", stats=DataStats())
    return [(e.prompt, e.completions, e.extras) for e in ex]


@pytest.mark.parametrize("table", sorted(TABLES))
def test_saved_dataset_equals_jsonl(table, tok, tmp_path):
    from datasets import Dataset, DatasetDict

    kind, rows = TABLES[table]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = _examples(str(jsonl), kind, tok)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert _examples(f"hf:{tmp_path / 'ds'}", kind, tok) == expected
    DatasetDict({"train": Dataset.from_list(rows[:1]), "test": Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert _examples(f"hf:{tmp_path / 'dd'}:test", kind, tok) == expected
    assert _examples(f"hf:{tmp_path / 'dd'}", kind, tok) == expected[:1]  # default split: train


def test_load_dataset_on_local_files(tok, tmp_path):
    """Not a save_to_disk directory: ``datasets.load_dataset`` (offline) on a folder of data files."""
    kind, rows = TABLES["pairwise_conversational"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _examples(f"hf:{tmp_path / 'data'}:train", kind, tok) == _examples(
        str(tmp_path / "rows.jsonl"), kind, tok
    )


def test_bad_row_names_dataset_split_and_row(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 17 + [
        {"prompt": "a", "chosen": "b", "rejected": None}
    ]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as e:
        load_records(f"hf:{tmp_path / 'dd'}:train", "pairwise")
    assert str(e.value) == f"hf:{tmp_path / 'dd'}[train]:row 17: missing field 'rejected'"
    with pytest.raises(ValueError, match=r"no split 'validation' \(has \['train'\]\)"):
        load_records(f"hf:{tmp_path / 'dd'}:validation", "pairwise")


def test_parse_hf_source():
    assert parse_hf_source("hf:/data/prefs") == ("/data/prefs", None)
    assert parse_hf_source("hf:/data/prefs:test") == ("/data/prefs", "test")
    assert parse_hf_source("hf:trl-lib/ultrafeedback_binarized:train") == (
        "trl-lib/ultrafeedback_binarized",
        "train",
    )
    assert parse_hf_source("hf:trl-lib/ultrafeedback_binarized") == ("trl-lib/ultrafeedback_binarized", None)
