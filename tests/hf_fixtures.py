"""Tiny Hugging Face artifacts as `transformers` saves them: a BPE tokenizer with a chat template and
a randomly initialised Llama, written with `save_pretrained` (nothing downloads)."""

from __future__ import annotations

import json
import os

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea. The sea is wide and deep and blue.",
    "Explain gradient descent. It follows the negative gradient of the loss.",
    "How many legs does a spider have? A spider has eight legs.",
    "0123456789 + - * / = ( ) , . ? ! : ; ' \"",
]

# Llama-3-like: BOS written by the template, end of turn = EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def save_tokenizer(path: str, *, vocab_size: int = 320, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on CORPUS, BOS added by its post-processor, saved by
    `transformers`. Returns the `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "</s>", "<pad>", "<|start|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


def save_llama(path: str, *, vocab_size: int, seed: int = 0, tokenizer=None) -> None:
    """A 2-layer Llama with random weights (norms and all), saved as safetensors by `transformers`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id if tokenizer else None,
        eos_token_id=tokenizer.eos_token_id if tokenizer else None,
        pad_token_id=tokenizer.pad_token_id if tokenizer else None,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)


def save_checkpoint(path: str, *, seed: int = 0, chat_template: str | None = CHAT_TEMPLATE) -> str:
    """Tokenizer and model in one directory, as a user's HF checkpoint looks. Returns ``path``."""
    tokenizer = save_tokenizer(path, chat_template=chat_template)
    save_llama(path, vocab_size=len(tokenizer), seed=seed, tokenizer=tokenizer)
    return path


def pair_rows(n: int = 24, *, conversational: bool = False, subsets: tuple[str, ...] = ()) -> list[dict]:
    """TRL-format preference rows (standard or conversational); with ``subsets``, RewardBench's
    ``subset`` column cycles through them."""
    rows = []
    for i in range(n):
        a, b = i % 7, i % 5 + 1
        prompt = f"What is {a} + {b}?"
        chosen, rejected = f" {a + b}.", f" {a + b + 1}."
        if conversational:
            row = dict(
                prompt=[{"role": "user", "content": prompt}],
                chosen=[{"role": "assistant", "content": chosen.strip()}],
                rejected=[{"role": "assistant", "content": rejected.strip()}],
            )
        else:
            row = dict(prompt=prompt, chosen=chosen, rejected=rejected)
        if subsets:
            row["subset"] = subsets[i % len(subsets)]
        rows.append(row)
    return rows


def write_pairs(path: str, n: int = 24, **kind) -> str:
    """:func:`pair_rows` as JSONL."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in pair_rows(n, **kind))
    return path


def save_pair_dataset(path: str, n: int = 24, **kind) -> str:
    """:func:`pair_rows` as a Hugging Face dataset written by ``datasets`` (``save_to_disk``)."""
    import datasets

    datasets.Dataset.from_list(pair_rows(n, **kind)).save_to_disk(path)
    return path
