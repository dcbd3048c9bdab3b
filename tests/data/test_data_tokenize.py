"""Tokenization against transformers.AutoTokenizer on a tokenizer built here (WordLevel + chat template)."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from alignjax.data import ChatTokenizer, DataError, DataStats, tokenize_record, truncate

VOCAB = {
    "<pad>": 0,
    "<s>": 1,
    "</s>": 2,
    "<|user|>": 3,
    "<|assistant|>": 4,
    "what": 5,
    "is": 6,
    "2+2": 7,
    "4": 8,
    "5": 9,
    "hi": 10,
    "hello": 11,
    "there": 12,
    "bye": 13,
    "<unk>": 14,
}
# BOS written by the template; assistant turns closed with EOS; a trailing space after EOS.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"])
    ct = ChatTokenizer(
        tok, chat_template=TEMPLATE, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    path = tmp_path_factory.mktemp("tok")
    ct.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def hf(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


PROMPT = [{"role": "user", "content": "what is 2+2"}]
CHOSEN = [{"role": "assistant", "content": "4"}]
REJECTED = [{"role": "assistant", "content": "5"}]


def test_chat_template_matches_transformers(tok_dir, hf):
    ct = ChatTokenizer.from_pretrained(tok_dir)
    for msgs, gen in ((PROMPT, True), (PROMPT + CHOSEN, False), (PROMPT + CHOSEN + PROMPT, True)):
        assert ct.apply_chat_template(msgs, add_generation_prompt=gen) == hf.apply_chat_template(
            msgs, add_generation_prompt=gen, tokenize=False
        )
    ex = tokenize_record({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, ct, tokenization="joint")
    # BOS once (template writes it), EOS once (template closes the turn; nothing appended).
    assert ex.prompt == [1, 3, 5, 6, 7, 4]
    assert ex.completions == [[8, 2], [9, 2]]
    # TRL's convention scores the whole rendered turn (here nothing follows EOS but a space the
    # whitespace pre-tokenizer drops): the same ids.
    trl = tokenize_record({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, ct)
    assert (trl.prompt, trl.completions) == (ex.prompt, ex.completions)
    for comp, full in ((ex.completions[0], CHOSEN), (ex.completions[1], REJECTED)):
        assert ex.prompt + comp == _ids(hf.apply_chat_template(PROMPT + full, tokenize=True))
    assert ex.prompt == _ids(hf.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True))


def test_joint_string_prompt_bos_from_post_processor_eos_appended(tok_dir, hf):
    ct = ChatTokenizer.from_pretrained(tok_dir)
    ex = tokenize_record(
        {"prompt": "what is", "chosen": " 2+2 4", "rejected": " hi"}, ct, tokenization="joint"
    )
    assert ex.prompt == hf("what is")["input_ids"] == [1, 5, 6]
    assert ex.completions == [[7, 8, 2], [10, 2]]
    assert ex.prompt + ex.completions[0][:-1] == hf("what is 2+2 4")["input_ids"]  # joint tokenization
    # A prompt that already starts with BOS text does not get a second one; an EOS in the text is not doubled.
    row = {"prompt": "<s> hi", "chosen": " hello </s>", "rejected": " bye"}
    ex = tokenize_record(row, ct, tokenization="joint")
    assert ex.prompt == [1, 10] and ex.completions == [[11, 2], [13, 2]]
    # TRL keeps the doubled BOS (tokenizer(prompt) as is).
    assert tokenize_record(row, ct).prompt == hf("<s> hi")["input_ids"] == [1, 1, 10]
    assert ct.boundary_fallbacks == 0


def test_boundary_fallback_tokenizes_completion_alone(tok_dir):
    ct = ChatTokenizer.from_pretrained(tok_dir)
    # "what is2+2" joins into one unknown word, so the joint tokenization does not start with the prompt ids.
    stats = DataStats()
    row = {"prompt": "what is", "chosen": "2+2", "rejected": "4"}
    ex = tokenize_record(row, ct, tokenization="joint", stats=stats)
    assert ex.completions == [[7, 2], [8, 2]] and ct.boundary_fallbacks == 2 and stats.boundary_shifts == 1
    # TRL: the prompt ends where the joint tokenizations diverge (after "what"), "is2+2" is scored.
    ex = tokenize_record(row, ct, stats=stats)
    assert ex.prompt == [1, 5] and ex.completions == [[14, 2], [14, 2]] and stats.boundary_shifts == 2


def test_truncation_order_and_modes():
    # max_prompt_length keeps the prompt's end, max_completion_length the completions' starts; then
    # keep_start cuts each prompt+completion's end to max_length.
    stats = DataStats()
    p, cs = truncate(
        [1, 2, 3, 4, 5],
        [[6, 7, 8], [9]],
        max_length=5,
        max_prompt_length=3,
        max_completion_length=3,
        stats=stats,
    )
    assert (p, cs) == ([3, 4, 5], [[6, 7], [9]])
    assert (stats.truncated_prompts, stats.truncated_completions) == (1, 1)
    p, cs = truncate([1, 2, 3], [[6, 7, 8, 9], [9]], max_length=None, max_completion_length=2)
    assert (p, cs) == ([1, 2, 3], [[6, 7], [9]])
    # keep_end keeps each sequence's end: the prompt loses its start, sized by the longest completion.
    p, cs = truncate([1, 2, 3, 4, 5], [[6, 7, 8], [9]], max_length=6, truncation_mode="keep_end")
    assert (p, cs) == ([3, 4, 5], [[6, 7, 8], [9]])
    with pytest.raises(DataError, match=r"^d:2: a completion has 6 tokens, leaving no room for the prompt"):
        truncate([1, 2], [[3] * 6], max_length=6, truncation_mode="keep_end", where="d:2")
    with pytest.raises(DataError) as e:
        truncate([1, 2, 3, 4, 5], [[6]], max_length=5, where="d.jsonl:7")
    assert str(e.value) == (
        "d.jsonl:7: prompt has 5 tokens, leaving no room for a completion within data.max_length=5; "
        "set data.max_prompt_length to cut the prompt"
    )
    assert e.value.reason == "prompt_too_long"
    with pytest.raises(ValueError, match="data.truncation_mode must be one of"):
        truncate([1], [[2]], max_length=4, truncation_mode="left")


def test_unknown_word_is_a_data_error(tok_dir):
    from alignjax.data import synthetic

    with pytest.raises(DataError, match=r"^x.jsonl:3: cannot tokenize 'ab\+cd=': "):
        tokenize_record(
            {"prompt": "ab+cd=", "completion": "1"}, synthetic.arithmetic_tokenizer(), where="x.jsonl:3"
        )
