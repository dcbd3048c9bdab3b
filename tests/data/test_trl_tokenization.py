"""``data.tokenization = "trl"`` (the default) gives the token ids TRL 1.16's DPOTrainer gives.

TRL's own code does the reference tokenization: a real ``DPOTrainer`` (tiny Llama saved by
``transformers``) tokenizes each corpus with ``_prepare_dataset``, and its
``DataCollatorForPreference`` truncates. The corpora exercise every boundary case: prompts ending in
whitespace or cut mid-word (tokens straddle the boundary), a prompt that already starts with the BOS
text, completions already ending with the EOS text, ChatML turns whose end (``<|im_end|>\\n``) is or
is not the EOS, multi-turn and implicit-prompt conversations. Every tokenizer family of
tests/data/tokenizer_zoo.py runs.
"""

import pytest

from alignjax.data import ChatTokenizer, DataStats, load_records
from alignjax.data.pipeline import tokenize_all
from alignjax.data.tokenize import truncate
from tests.data import tokenizer_zoo


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def standard_rows(bos: str | None, eos: str) -> list[dict]:
    rows = [
        {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " The sea."},
        # Prompt ends in whitespace: " Paris" is one token, so the prompt's last token moves.
        {"prompt": "What is the capital of France? ", "chosen": "Paris.", "rejected": "Paris, not six."},
        # Cut mid-word: "fox" merges across the boundary.
        {"prompt": "The quick brown fo", "chosen": "x jumps over the lazy dog.", "rejected": "o."},
        # Already ends with the EOS text: not appended twice.
        {"prompt": "How many legs does a spider have?", "chosen": " Eight." + eos, "rejected": " Six."},
        {"prompt": "Question: Is the sea blue?\n", "chosen": "\nyes", "rejected": "no\n\n"},
    ]
    if bos:  # The prompt already starts with the BOS text: TRL keeps both BOS.
        rows.append(
            {"prompt": bos + "Explain gradient descent.", "chosen": " It follows.", "rejected": " No."}
        )
    return rows


CONVERSATIONS = [
    {
        "prompt": [user("What is the capital of France?")],
        "chosen": [assistant("Paris.")],
        "rejected": [assistant("Blue.")],
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer: yes or no."},
            user("Is the sea blue?"),
            assistant("yes"),
            user("Deep?"),
        ],
        "chosen": [assistant("yes")],
        "rejected": [assistant("no, maybe")],
    },
    # Whitespace at the edges of the turns.
    {
        "prompt": [user("Explain gradient descent. ")],
        "chosen": [assistant(" It follows the loss.\n")],
        "rejected": [assistant("no ")],
    },
]
IMPLICIT = [
    {
        "chosen": [user("How many legs does a spider have?"), assistant("Eight.")],
        "rejected": [user("How many legs does a spider have?"), assistant("Six, not eight.")],
    },
    {
        "chosen": [
            user("Is the sea blue?"),
            assistant("yes"),
            user("Wide?"),
            assistant("yes, wide and deep"),
        ],
        "rejected": [user("Is the sea blue?"), assistant("yes"), user("Wide?"), assistant("no")],
    },
]


@pytest.fixture(scope="module", params=tokenizer_zoo.NAMES)
def trl_setup(request, tmp_path_factory):
    """(name, tokenizer dir, TRL DPOTrainer) for one tokenizer family."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    root = tmp_path_factory.mktemp(request.param)
    path = tokenizer_zoo.save(request.param, str(root / "ckpt"))
    hf_tok = AutoTokenizer.from_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    args = DPOConfig(output_dir=str(root / "out"), max_length=None, report_to=[], use_cpu=True)
    from datasets import Dataset

    warmup = Dataset.from_list(standard_rows(None, hf_tok.eos_token))
    trainer = DPOTrainer(model=path, args=args, processing_class=hf_tok, train_dataset=warmup)
    return request.param, path, trainer


def trl_ids(trainer, rows):
    from datasets import Dataset

    ds = trainer._prepare_dataset(Dataset.from_list(rows), trainer.processing_class, trainer.args, "t")
    return [(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) for ex in ds]


def our_ids(path, rows, stats=None):
    records = load_records(rows, "pairwise")
    examples, _ = tokenize_all(
        records, ChatTokenizer.from_pretrained(path), on_bad_row="error", stats=stats or DataStats()
    )
    return [(ex.prompt, *ex.completions) for ex in examples]


def test_standard_rows_equal_trl(trl_setup):
    name, path, trainer = trl_setup
    tok = trainer.processing_class
    rows = standard_rows(tok.bos_token, tok.eos_token)
    stats = DataStats()
    assert our_ids(path, rows, stats) == trl_ids(trainer, rows)
    assert stats.boundary_shifts >= 1  # the whitespace / mid-word rows really straddle the boundary


def test_conversational_rows_equal_trl(trl_setup):
    name, path, trainer = trl_setup
    ours = our_ids(path, CONVERSATIONS)
    assert ours == trl_ids(trainer, CONVERSATIONS)
    if name.startswith("chatml"):  # the turn's end is scored: <|im_end|> then the newline, EOS or not
        im_end, newline = trainer.processing_class.convert_tokens_to_ids("<|im_end|>"), ours[0][1][-1]
        assert ours[0][1][-2] == im_end and trainer.processing_class.decode([newline]) == "\n"


def test_implicit_prompt_rows_equal_trl(trl_setup):
    _, path, trainer = trl_setup
    assert our_ids(path, IMPLICIT) == trl_ids(trainer, IMPLICIT)


@pytest.mark.parametrize("max_length", [6, 12, 20])
def test_keep_start_truncation_equals_trl_collator(trl_setup, max_length):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    _, path, trainer = trl_setup
    tok = trainer.processing_class
    rows = standard_rows(tok.bos_token, tok.eos_token)
    collator = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode="keep_start")
    for p, c, r in trl_ids(trainer, rows):
        if len(p) >= max_length:  # TRL drops these rows; alignjax reports them (prompt_too_long)
            continue
        batch = collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}])
        ours_p, (ours_c, ours_r) = truncate(p, [c, r], max_length=max_length, truncation_mode="keep_start")
        for row, mask, comp in zip(batch["input_ids"], batch["completion_mask"], (ours_c, ours_r)):
            n = len(ours_p) + len(comp)
            assert row.tolist()[:n] == ours_p + comp
            assert mask.tolist()[:n] == [0] * len(ours_p) + [1] * len(comp)


def test_joint_tokenization_is_the_named_alternative(trl_setup):
    """``tokenization="joint"`` keeps alignjax's earlier convention and differs from TRL where the
    module docstring says (one EOS, one BOS, the completion alone at a straddled boundary)."""
    name, path, trainer = trl_setup
    tok = ChatTokenizer.from_pretrained(path)
    rows = standard_rows(tok.special["bos_token"], tok.special["eos_token"])
    records = load_records(rows, "pairwise")
    joint, _ = tokenize_all(records, tok, on_bad_row="error", stats=DataStats(), tokenization="joint")
    assert [(ex.prompt, *ex.completions) for ex in joint] != trl_ids(trainer, rows)
    for ex in joint:
        assert all(c[-1] == tok.eos_id and c.count(tok.eos_id) == 1 for c in ex.completions)
        assert ex.prompt[:2] != [tok.bos_id, tok.bos_id]
