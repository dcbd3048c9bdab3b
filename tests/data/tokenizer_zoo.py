"""Tokenizers shaped like the common HF families, trained here and saved by ``transformers``.

Each builder trains a small BPE on CORPUS, wraps it in ``PreTrainedTokenizerFast`` and calls
``save_pretrained``, so the directory holds exactly the files a user's checkpoint has:

* ``llama3``: byte-level, BOS added by the post-processor *and* written by the template, EOS =
  ``<|eot_id|>`` which closes each turn (Llama-3-Instruct).
* ``chatml``: byte-level, no BOS, EOS = ``<|im_end|>``, a newline after each turn (Qwen2.5-Instruct);
  two named templates (``default`` and ``tool_use``: ``chat_template.jinja`` +
  ``additional_chat_templates/``).
* ``chatml_base``: the same template with the base model's EOS ``<|endoftext|>``, so the end of turn
  is not EOS (Qwen2.5 base).
* ``mistral``: metaspace (``▁``) pieces, BOS ``<s>`` from the post-processor and the template,
  ``[INST] ... [/INST]`` turns closed by ``</s>``; saved in the legacy layout (template inside
  ``tokenizer_config.json``, a ``special_tokens_map.json`` that alone names the pad token).
* ``nobos``: GPT-2-like, no BOS anywhere, EOS ``<|endoftext|>``, a plain-text template.
"""

from __future__ import annotations

import os

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea. The sea is wide and deep and blue.",
    "Explain gradient descent. It follows the negative gradient of the loss.",
    "How many legs does a spider have? A spider has eight legs. Eight, not six.",
    "user assistant system Answer: Question: yes no maybe",
    "0123456789 + - * / = ( ) , . ? ! : ; ' \" \n\n \n",
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOOL_TEMPLATE = "{% for m in messages %}<tool>{{ m['content'] }}{% endfor %}"
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
NOBOS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

NAMES = ("llama3", "chatml", "chatml_base", "mistral", "nobos")


def _bpe(special: list[str], *, metaspace: bool = False, vocab_size: int = 420):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>" if metaspace else None))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(CORPUS)) | {"▁"})
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _bos_post_processor(tok, bos: str) -> None:
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )


def build(name: str):
    """The ``PreTrainedTokenizerFast`` of one family (see the module docstring)."""
    from transformers import PreTrainedTokenizerFast

    if name == "llama3":
        special = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ]
        tok = _bpe(special)
        _bos_post_processor(tok, "<|begin_of_text|>")
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
        )
        fast.chat_template = LLAMA3_TEMPLATE
    elif name in ("chatml", "chatml_base"):
        tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        eos = "<|im_end|>" if name == "chatml" else "<|endoftext|>"
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>")
        fast.chat_template = (
            {"default": CHATML_TEMPLATE, "tool_use": CHATML_TOOL_TEMPLATE}
            if name == "chatml"
            else CHATML_TEMPLATE
        )
    elif name == "mistral":
        tok = _bpe(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], metaspace=True)
        _bos_post_processor(tok, "<s>")
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
        fast.chat_template = MISTRAL_TEMPLATE
    elif name == "nobos":
        tok = _bpe(["<|endoftext|>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
        fast.chat_template = NOBOS_TEMPLATE
    else:
        raise ValueError(f"unknown tokenizer family {name!r}; known: {NAMES}")
    return fast


def save(name: str, path: str) -> str:
    """Builds ``name`` and saves it with ``save_pretrained`` into ``path``; returns ``path``."""
    fast = build(name)
    os.makedirs(path, exist_ok=True)
    # Mistral's checkpoints predate chat_template.jinja: template in tokenizer_config.json.
    fast.save_pretrained(path, save_jinja_files=name != "mistral")
    if name == "mistral":
        import json

        with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            # A pad token only here, as fine-tunes often leave it: transformers reads it from this file.
            json.dump(
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, f
            )
    return path
