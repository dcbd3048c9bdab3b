"""Tokenization: Hugging Face ``tokenizers`` plus the chat template, rendered as transformers does.

Boundary policy (prompt vs completion), documented because every DPO implementation differs here:

* String prompts are encoded like ``transformers``' ``tokenizer(prompt)``: with the tokenizer's
  post-processor (which adds BOS where tokenizer.json says so). Chat prompts are rendered with
  ``add_generation_prompt=True`` and encoded without special tokens, like ``apply_chat_template``,
  so BOS appears exactly when the template writes it. A doubled leading BOS is collapsed to one.
* The completion text of a chat is the full conversation's rendering minus the prompt's rendering
  (an error if the template does not render the prompt as a prefix). For strings it is the text.
* **Joint where possible**: the completion ids are the tail of the tokenization of prompt+completion
  when that tokenization starts with exactly the prompt ids, so ``prompt_ids + completion_ids`` equals
  the tokenization of the full text. When a token straddles the boundary (BPE merges across it), the
  completion is tokenized on its own (TRL style) and ``boundary_fallbacks`` counts it.
* The completion ends with exactly one EOS: if the template already closed the turn with EOS
  (possibly followed by whitespace), it is cut right after that EOS; otherwise EOS is appended.

Truncation (TRL's order): the prompt is cut to ``max_prompt_length`` keeping its end
(``truncation_mode="keep_end"``, the default: the question is usually last) or its start
(``"keep_start"``); then a prompt that leaves no room within ``max_length`` is a bad row
(``prompt_too_long``); then each completion is cut to ``max_length - len(prompt)`` keeping its start.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from alignjax.data.schema import BATCH_FLOAT_FIELDS, REASON_PROMPT_TOO_LONG, REASON_TYPE, DataError, DataStats

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _compile_template(template: str):
    """Jinja2 environment as in transformers' ``_compile_jinja_template`` (sandboxed, trim/lstrip blocks)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


@dataclasses.dataclass
class TokenizedExample:
    """One tokenized record: a prompt and its completions (pairs: [chosen, rejected]; listwise: all
    candidates; unpaired/sft: [completion]) plus per-example scalars (``margin``, ``label``, ...)."""

    prompt: list[int]
    completions: list[list[int]]
    extras: dict[str, Any]
    where: str = ""


class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` with its special tokens and chat template.

    ``ChatTokenizer.from_pretrained(dir)`` reads ``tokenizer.json`` and ``tokenizer_config.json``
    (the files ``transformers.AutoTokenizer`` reads); ``save_pretrained(dir)`` writes them back.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token,
            "unk_token": unk_token,
        }
        self.extra_config = dict(extra_config or {})
        self._template = _compile_template(chat_template) if chat_template else None
        self.boundary_fallbacks = 0
        if eos_token is None:
            raise ValueError("tokenizer has no eos_token (set it in tokenizer_config.json)")

    # ---- files ----
    @classmethod
    def from_pretrained(cls, path: str) -> ChatTokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        cfg_path = os.path.join(path, "tokenizer_config.json")
        cfg: dict[str, Any] = {}
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = {t["name"]: t["template"] for t in template}.get("default")
        extra = {k: v for k, v in cfg.items() if k not in SPECIAL_KEYS and k != "chat_template"}
        return cls(
            tok,
            chat_template=template,
            extra_config=extra,
            **{k: _token_str(cfg.get(k)) for k in SPECIAL_KEYS},
        )

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **self.extra_config}
        cfg.update({k: v for k, v in self.special.items() if v is not None})
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)

    # ---- ids ----
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.special["bos_token"])

    @property
    def eos_id(self) -> int:
        return self.token_id(self.special["eos_token"])

    @property
    def pad_id(self) -> int:
        """Padding id: ``pad_token``, else EOS (padding is masked out everywhere, its id is irrelevant)."""
        pad = self.token_id(self.special["pad_token"])
        return self.eos_id if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
        except Exception as e:  # tokenizers raises a bare Exception (e.g. a character outside the vocab)
            raise ValueError(f"cannot tokenize {text[:80]!r}: {e}") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- templates ----
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Renders ``messages`` with the chat template (same variables as transformers)."""
        if self._template is None:
            raise ValueError(
                "chat messages given but the tokenizer has no chat_template "
                "(tokenizer_config.json key 'chat_template')"
            )
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **self.special,
        )

    def _dedupe_bos(self, ids: list[int]) -> list[int]:
        bos = self.bos_id
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            return ids[1:]
        return ids

    def prompt_text(self, prompt: str | list[dict]) -> str:
        return (
            prompt
            if isinstance(prompt, str)
            else self.apply_chat_template(prompt, add_generation_prompt=True)
        )

    def encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        """Prompt ids (see the module docstring for the BOS policy)."""
        if isinstance(prompt, str):
            ids = self.encode(prompt, add_special_tokens=True)
            if len(ids) > 1 and ids[-1] == self.eos_id:  # a post-processor that also appends EOS
                ids = ids[:-1]
        else:
            ids = self.encode(self.prompt_text(prompt), add_special_tokens=False)
        return self._dedupe_bos(ids)

    def _full_text(self, prompt: str | list[dict], completion: str | list[dict]) -> tuple[str, str]:
        if isinstance(prompt, str):
            return prompt + completion, completion
        ptext = self.prompt_text(prompt)
        full = self.apply_chat_template(list(prompt) + list(completion), add_generation_prompt=False)
        if not full.startswith(ptext):
            raise ValueError(
                "chat template does not render the prompt (with add_generation_prompt=True) as a "
                "prefix of the full conversation; cannot split prompt from completion"
            )
        return full, full[len(ptext) :]

    def encode_completion(
        self,
        prompt: str | list[dict],
        completion: str | list[dict],
        prompt_ids: list[int] | None = None,
        *,
        append_eos: bool = True,
    ) -> list[int]:
        """Completion ids ending in exactly one EOS (joint tokenization where the boundary allows);
        ``append_eos=False`` returns them as written (a partial solution the model continues after)."""
        prompt_ids = self.encode_prompt(prompt) if prompt_ids is None else prompt_ids
        full_text, comp_text = self._full_text(prompt, completion)
        full_ids = self._dedupe_bos(self.encode(full_text, add_special_tokens=isinstance(prompt, str)))
        if full_ids[: len(prompt_ids)] == prompt_ids:
            ids = full_ids[len(prompt_ids) :]
        else:
            self.boundary_fallbacks += 1
            ids = self.encode(comp_text, add_special_tokens=False)
        if not append_eos:
            return ids
        eos = self.eos_id
        if eos in ids:
            last = len(ids) - 1 - ids[::-1].index(eos)
            if not self.decode(ids[last + 1 :], skip_special_tokens=False).strip():
                return ids[: last + 1]  # template closed the turn with EOS (+ whitespace): keep one EOS
        while ids and ids[-1] == eos:
            ids = ids[:-1]
        return ids + [eos]


def truncate(
    prompt: list[int],
    completions: list[list[int]],
    *,
    max_length: int | None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    where: str = "",
    stats: DataStats | None = None,
) -> tuple[list[int], list[list[int]]]:
    """Truncates prompt first (to ``max_prompt_length``, ``keep_end``/``keep_start``), then completions.

    Raises DataError(prompt_too_long) when the prompt leaves no room within ``max_length``.
    """
    if truncation_mode not in ("keep_end", "keep_start"):
        raise ValueError(f"truncation_mode must be 'keep_end' or 'keep_start', got {truncation_mode!r}")
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:] if truncation_mode == "keep_end" else prompt[:max_prompt_length]
        if stats is not None:
            stats.truncated_prompts += 1
    if max_length is None:
        return prompt, completions
    if len(prompt) >= max_length:
        hint = "" if max_prompt_length is not None else " (set max_prompt_length to truncate prompts)"
        raise DataError(
            where,
            REASON_PROMPT_TOO_LONG,
            f"prompt has {len(prompt)} tokens, leaving no room for a completion within "
            f"max_length={max_length}{hint}",
        )
    room = max_length - len(prompt)
    out = []
    for c in completions:
        if len(c) > room and stats is not None:
            stats.truncated_completions += 1
        out.append(c[:room])
    return prompt, out


_SCALAR_KEYS = ("label", "user_id", "scores", *BATCH_FLOAT_FIELDS)


def tokenize_record(
    record: Mapping[str, Any],
    tokenizer: ChatTokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    where: str = "",
    stats: DataStats | None = None,
) -> TokenizedExample:
    """Tokenizes a validated record (any kind) into a TokenizedExample; errors name ``where``."""
    prompt = record["prompt"]
    if "chosen" in record:
        comps = [record["chosen"], record["rejected"]]
    elif "candidates" in record:
        comps = list(record["candidates"])
    else:
        comps = [record["completion"]]
    try:
        p_ids = tokenizer.encode_prompt(prompt)
        append_eos = record.get("append_eos", True)
        c_ids = [tokenizer.encode_completion(prompt, c, p_ids, append_eos=append_eos) for c in comps]
    except ValueError as e:
        raise DataError(where, REASON_TYPE, str(e)) from None
    p_ids, c_ids = truncate(
        p_ids,
        c_ids,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        where=where,
        stats=stats,
    )
    extras = {k: record[k] for k in _SCALAR_KEYS if k in record}
    return TokenizedExample(p_ids, c_ids, extras, where)
