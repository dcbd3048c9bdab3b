"""ChatTokenizer.from_pretrained reads tokenizer directories as transformers.AutoTokenizer does.

Each family of tests/data/tokenizer_zoo.py is saved by ``transformers`` and loaded both ways; the
resolved chat template, its rendering, the special tokens and their ids, and plain encodings must be
the same. ``ChatTokenizer.save_pretrained`` must write what AutoTokenizer reads back the same way.
"""

import json
import os

import pytest

from alignjax.data import ChatTokenizer
from tests.data import tokenizer_zoo

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer: yes or no."},
        {"role": "user", "content": "Is the sea blue?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "How many legs does a spider have?"},
    ],
    [
        {"role": "user", "content": "Explain gradient descent. "},
        {"role": "assistant", "content": " It follows the loss."},
    ],
]
TEXTS = ["The quick brown fox", "<s>What is", "Paris.<|im_end|>\n", " spider  legs ", "[INST] six [/INST]"]
SPECIAL_IDS = ("bos_token", "eos_token", "pad_token", "unk_token")


@pytest.fixture(scope="module", params=tokenizer_zoo.NAMES)
def saved(request, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tokenizer_zoo.save(request.param, str(tmp_path_factory.mktemp(request.param)))
    return request.param, path, AutoTokenizer.from_pretrained(path)


def _hf_ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def assert_same_as_hf(ours: ChatTokenizer, hf) -> None:
    assert ours.chat_template == hf.get_chat_template()
    if isinstance(hf.chat_template, dict):
        assert ours.chat_templates == hf.chat_template
    for key in SPECIAL_IDS:
        assert ours.special.get(key) == getattr(hf, key), key
        assert ours.token_id(ours.special.get(key)) == getattr(hf, f"{key}_id"), key
    assert {k: v for k, v in ours.special.items() if v is not None} == hf.special_tokens_map
    assert ours.vocab_size == len(hf)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == hf(text)["input_ids"], text
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    for conv in CONVERSATIONS:
        for gen in (True, False):
            text = ours.apply_chat_template(conv, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            ids = hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True)
            assert ours.encode(text) == _hf_ids(ids)


def test_from_pretrained_matches_autotokenizer(saved):
    name, path, hf = saved
    ours = ChatTokenizer.from_pretrained(path)
    assert_same_as_hf(ours, hf)
    # The file layouts the zoo exercises, so a layout change in transformers shows here.
    files = set(os.listdir(path))
    if name == "mistral":
        assert "chat_template.jinja" not in files and "special_tokens_map.json" in files
        assert ours.special["pad_token"] == "<unk>"  # only special_tokens_map.json names it
    else:
        assert "chat_template.jinja" in files
    if name == "chatml":
        assert ours.chat_templates["tool_use"] == tokenizer_zoo.CHATML_TOOL_TEMPLATE
        assert ours.chat_template == tokenizer_zoo.CHATML_TEMPLATE


def test_save_pretrained_reads_back_the_same(saved, tmp_path):
    from transformers import AutoTokenizer

    _, path, hf = saved
    ChatTokenizer.from_pretrained(path).save_pretrained(str(tmp_path))
    again_hf = AutoTokenizer.from_pretrained(str(tmp_path))
    again = ChatTokenizer.from_pretrained(str(tmp_path))
    assert_same_as_hf(again, again_hf)
    assert_same_as_hf(again, hf)


def test_template_file_wins_over_config_and_legacy_json(tmp_path):
    from transformers import AutoTokenizer

    path = tokenizer_zoo.save("nobos", str(tmp_path / "tok"))
    cfg_file = os.path.join(path, "tokenizer_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["chat_template"] = "{{ 'from config' }}"
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    hf = AutoTokenizer.from_pretrained(path)
    assert (
        ChatTokenizer.from_pretrained(path).chat_template
        == hf.get_chat_template()
        == tokenizer_zoo.NOBOS_TEMPLATE
    )
    os.remove(os.path.join(path, "chat_template.jinja"))
    hf = AutoTokenizer.from_pretrained(path)
    assert (
        ChatTokenizer.from_pretrained(path).chat_template == hf.get_chat_template() == "{{ 'from config' }}"
    )
    # Processors' legacy chat_template.json is the last resort (AutoTokenizer itself ignores it).
    del cfg["chat_template"]
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(path, "chat_template.json"), "w") as f:
        json.dump({"chat_template": "{{ 'legacy' }}"}, f)
    assert ChatTokenizer.from_pretrained(path).chat_template == "{{ 'legacy' }}"


def test_named_templates_without_default_fail_on_use(tmp_path):
    path = tokenizer_zoo.save("chatml", str(tmp_path / "tok"))
    os.remove(os.path.join(path, "chat_template.jinja"))
    ours = ChatTokenizer.from_pretrained(path)
    with pytest.raises(ValueError, match="several chat templates and none named 'default'"):
        ours.apply_chat_template(CONVERSATIONS[0])


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: no such file"):
        ChatTokenizer.from_pretrained(str(tmp_path))
