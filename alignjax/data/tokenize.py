"""Tokenization: Hugging Face ``tokenizers`` plus the chat template, rendered as transformers does.

Where the prompt ends and the completion starts is a convention every DPO implementation sets its
own way; ``tokenization=`` (config key ``data.tokenization``) names the one used.

``"trl"`` (the default) is TRL 1.16's ``DPOTrainer._prepare_dataset``, token for token:

* Standard (string) rows: each completion gets the EOS *text* appended unless it already ends with
  it (records with ``append_eos: false`` get none); the prompt and each prompt+completion are
  encoded as ``tokenizer(text)`` does, post-processor (BOS) included. A prompt that already starts
  with the BOS text therefore gets a second BOS, as in TRL.
* Conversational rows: the prompt is rendered with ``add_generation_prompt=True`` and each
  prompt+completion conversation without it, both encoded without special tokens (as
  ``apply_chat_template(tokenize=True)``). Nothing is appended or cut: a ChatML completion ends
  ``<|im_end|>`` ``\n``, and both count.
* The prompt is the longest common prefix of the prompt ids and every prompt+completion's ids;
  each completion is the rest of its own sequence. Where a token straddles the boundary (a prompt
  ending in whitespace, BPE merges across it) the prompt loses its last tokens to the completions,
  and ``DataStats.boundary_shifts`` counts the row (TRL warns once).

``"joint"`` (alignjax's earlier convention): string prompts encoded with the post-processor and a
doubled leading BOS collapsed to one; a chat completion's text is the full rendering minus the
prompt's rendering; the completion ids are the tail of the joint tokenization when that starts with
exactly the prompt ids, else the completion text tokenized on its own (``boundary_fallbacks``
counts those); every completion ends with exactly one EOS (cut after the template's EOS, or
appended).

Truncation (:func:`truncate`): ``max_prompt_length`` keeps the prompt's last tokens and
``max_completion_length`` each completion's first (TRL <= 0.2x ``tokenize_row``); then each
prompt+completion sequence is cut to ``max_length`` as TRL 1.16's collator does:
``truncation_mode="keep_start"`` (the default) keeps its start, so completions lose their ends and a
prompt that fills ``max_length`` is a bad row (``prompt_too_long``; TRL drops it silently);
``"keep_end"`` keeps its end, so the prompt loses its start (one cut for all completions, sized by
the longest: the prompt is shared in alignjax's layouts).

Two kinds of sequence carry tokens of their own that condition the completion but are not scored
as it: a completion ``j`` whose first ``extras["prefix_lengths"][j]`` tokens are such a prefix.

* DOVE rows (``chosen_prompt`` / ``rejected_prompt``): each side is tokenized and truncated as a
  row of its own (its instruction the prompt); the example's shared prompt is empty and each
  completion is the side's instruction (the prefix) followed by its response.
* Rationales (``rationale_template`` given, as the trainer does for losses that read
  ``rationale_logps``): a third completion, ``rationale_template`` filled with the two responses'
  texts (the prefix) and then the record's ``rationale`` plus EOS, after the shared prompt; it is
  cut to ``max_length`` like the pair's sequences.
* Preference degrees (``degree_removals`` given, as the trainer does for losses that read
  ``degree_labels``): a third and fourth completion, the chosen and rejected responses with some of
  their key content removed (:mod:`alignjax.data.degrees`; chat responses as their plain text), each
  encoded on its own plus EOS after the shared prompt and cut to ``max_length``; their class labels
  are the extra ``degree_labels``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from alignjax.data import degrees
from alignjax.data.schema import (
    BATCH_FLOAT_FIELDS,
    OWN_PROMPTS,
    REASON_IDENTICAL_AFTER_TRUNCATION,
    REASON_MISSING,
    REASON_PROMPT_TOO_LONG,
    REASON_TYPE,
    DataError,
    DataStats,
)

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.50 save_pretrained writes the template here
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # named templates other than "default", one .jinja each
LEGACY_CHAT_TEMPLATE_JSON = "chat_template.json"  # processors' legacy file: {"chat_template": "..."}


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_chat_templates(path: str, config: Mapping[str, Any]) -> dict[str, str]:
    """The named chat templates of a tokenizer directory, resolved as transformers' ``from_pretrained``.

    Template files win over ``tokenizer_config.json``: ``chat_template.jinja`` is ``"default"`` and
    each ``additional_chat_templates/<name>.jinja`` is ``<name>``. Without files, the config's
    ``chat_template`` (a string, or a list of ``{"name", "template"}``). Last, the legacy processor
    file ``chat_template.json`` (transformers reads it through ``AutoProcessor`` only).
    """
    templates: dict[str, str] = {}
    if os.path.exists(os.path.join(path, CHAT_TEMPLATE_FILE)):
        templates["default"] = _read_text(os.path.join(path, CHAT_TEMPLATE_FILE))
    named_dir = os.path.join(path, CHAT_TEMPLATE_DIR)
    if os.path.isdir(named_dir):
        for name in sorted(os.listdir(named_dir)):
            if name.endswith(".jinja"):
                templates[name.removesuffix(".jinja")] = _read_text(os.path.join(named_dir, name))
    if templates:
        return templates
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    if isinstance(template, str):
        return {"default": template}
    legacy = _read_json(os.path.join(path, LEGACY_CHAT_TEMPLATE_JSON)).get("chat_template")
    return {"default": legacy} if isinstance(legacy, str) else {}


def read_special_tokens(path: str, config: Mapping[str, Any]) -> dict[str, str]:
    """Named special tokens (``bos_token``, ... and model-specific ``*_token`` strings) as transformers
    resolves them: ``tokenizer_config.json``, overridden by the legacy ``special_tokens_map.json``
    unless the config carries ``added_tokens_decoder`` (then transformers ignores that file)."""
    merged = {k: v for k, v in config.items() if k.endswith("_token")}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        merged.update(extra)
    if "added_tokens_decoder" not in config:
        legacy = _read_json(os.path.join(path, "special_tokens_map.json"))
        merged.update({k: v for k, v in legacy.items() if k.endswith("_token")})
    out = {}
    for key, value in merged.items():
        token = _token_str(value)
        if isinstance(token, str):
            out[key] = token
    return out


def _generation_extension() -> type:
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker) renders its body."""
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


def _compile_template(template: str):
    """Jinja2 environment as in transformers' ``_compile_jinja_template`` (sandboxed, trim/lstrip blocks,
    ``raise_exception``, ``tojson`` without HTML escaping, ``strftime_now``, the ``generation`` tag)."""
    import datetime

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
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_generation_extension(), jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


@dataclasses.dataclass
class TokenizedExample:
    """One tokenized record: a prompt and its completions (pairs: [chosen, rejected]; listwise: all
    candidates; unpaired/sft: [completion]) plus per-example scalars (``margin``, ``label``, ...)."""

    prompt: list[int]
    completions: list[list[int]]
    extras: dict[str, Any]
    where: str = ""

    def prefix_length(self, j: int) -> int:
        """Leading tokens of completion ``j`` that condition it but are not scored (module doc)."""
        return int(self.extras["prefix_lengths"][j]) if "prefix_lengths" in self.extras else 0


class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` with its special tokens and chat template(s).

    ``ChatTokenizer.from_pretrained(dir)`` reads a directory as ``transformers.AutoTokenizer`` does
    (``tokenizer.json`` with its added tokens and post-processor, ``tokenizer_config.json``,
    ``special_tokens_map.json``, ``chat_template.jinja``, ``additional_chat_templates/``, and the
    legacy ``chat_template.json``); ``save_pretrained(dir)`` writes what transformers 5.x writes.
    ``chat_templates`` maps names to templates; the one used is ``"default"``, as in transformers.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        chat_template: str | None = None,
        chat_templates: Mapping[str, str] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        name: str = "",
    ):
        self.tokenizer = tokenizer
        self.chat_templates = dict(chat_templates or {})
        if chat_template is not None:
            self.chat_templates["default"] = chat_template
        self.chat_template = self.chat_templates.get("default")
        # Every named special token (what transformers passes to the template as variables).
        self.special: dict[str, str | None] = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token,
            "unk_token": unk_token,
        }
        self.special.update(special_tokens or {})
        self.extra_config = dict(extra_config or {})
        self._template = _compile_template(self.chat_template) if self.chat_template else None
        self.boundary_fallbacks = 0
        if self.special["eos_token"] is None:
            where = f"{name}: " if name else ""
            raise ValueError(f"{where}tokenizer has no eos_token (set it in tokenizer_config.json)")

    # ---- files ----
    @classmethod
    def from_pretrained(cls, path: str) -> ChatTokenizer:
        from tokenizers import Tokenizer

        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"data.tokenizer={path}: no such tokenizer directory (give a built-in name or a "
                "directory with tokenizer.json)"
            )
        if not os.path.exists(tok_file):
            raise FileNotFoundError(
                f"{tok_file}: no such file (data.tokenizer must be a built-in name or a directory "
                "with tokenizer.json)"
            )
        tok = Tokenizer.from_file(tok_file)
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        special = read_special_tokens(path, cfg)
        drop = {"chat_template", "added_tokens_decoder", "extra_special_tokens", *special}
        return cls(
            tok,
            chat_templates=read_chat_templates(path, cfg),
            special_tokens=special,
            extra_config={k: v for k, v in cfg.items() if k not in drop},
            name=path,
        )

    def save_pretrained(self, path: str) -> None:
        """Writes ``tokenizer.json``, ``tokenizer_config.json`` and the templates as transformers 5.x
        does (``chat_template.jinja`` for ``"default"``, ``additional_chat_templates/<name>.jinja``)."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        cfg = {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", **self.extra_config}
        cfg.update({k: v for k, v in self.special.items() if v is not None})
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
        for name, template in self.chat_templates.items():
            if name == "default":
                out = os.path.join(path, CHAT_TEMPLATE_FILE)
            else:
                os.makedirs(os.path.join(path, CHAT_TEMPLATE_DIR), exist_ok=True)
                out = os.path.join(path, CHAT_TEMPLATE_DIR, f"{name}.jinja")
            with open(out, "w", encoding="utf-8") as f:
                f.write(template)

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

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int] | ValueError]:
        """``encode`` of each text, batched (the ``tokenizers`` library's threads); a text that cannot
        be tokenized gives the ValueError ``encode`` raises, in its place."""
        if not texts:
            return []
        try:
            encodings = self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        except Exception:  # one bad text fails the batch: find it (and keep the others) one by one
            out: list[list[int] | ValueError] = []
            for text in texts:
                try:
                    out.append(self.encode(text, add_special_tokens=add_special_tokens))
                except ValueError as e:
                    out.append(e)
            return out
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- templates ----
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Renders ``messages`` with the ``"default"`` chat template and the variables transformers
        passes (``messages``, ``add_generation_prompt``, ``tools``/``documents`` = None, and each
        special token that is set)."""
        if self._template is None:
            if self.chat_templates:
                raise ValueError(
                    "the tokenizer has several chat templates and none named 'default' "
                    f"(has {sorted(self.chat_templates)})"
                )
            raise ValueError(
                "chat messages given but the tokenizer has no chat template "
                "(chat_template.jinja or tokenizer_config.json key 'chat_template')"
            )
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **{k: v for k, v in self.special.items() if v is not None},
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
        """``tokenization="joint"``'s prompt ids (module docstring), also the prompt a generation
        starts from."""
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
        """``tokenization="joint"``: completion ids ending in exactly one EOS (the tail of the joint
        tokenization where the boundary allows, else the completion text alone); ``append_eos=False``
        returns them as written (a partial solution the model continues after)."""
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


TOKENIZATIONS = ("trl", "joint")
TRUNCATION_MODES = ("keep_start", "keep_end")


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading ids ``a`` and ``b`` share (TRL's ``common_prefix_length``)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _render(tokenizer: ChatTokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template's text; a template's own ``raise_exception`` becomes a ValueError (a bad row)."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


def trl_texts(
    tokenizer: ChatTokenizer,
    prompt: str | list[dict],
    completions: Sequence[str | list[dict]],
    *,
    append_eos: bool = True,
) -> tuple[list[str], bool]:
    """``([prompt text, prompt+completion text, ...], add_special_tokens)`` that TRL 1.16 encodes."""
    if isinstance(prompt, str):
        eos = tokenizer.special["eos_token"]
        texts = [c if not append_eos or c.endswith(eos) else c + eos for c in completions]
        return [prompt, *(prompt + c for c in texts)], True
    full = [_render(tokenizer, list(prompt) + list(c), False) for c in completions]
    return [_render(tokenizer, prompt, True), *full], False


def trl_split(ids: Sequence[list[int]]) -> tuple[list[int], list[list[int]], bool]:
    """``(prompt_ids, completion_ids, shifted)`` from the encoded :func:`trl_texts` (module docstring)."""
    prompt_ids, fulls = ids[0], ids[1:]
    n = min(common_prefix_length(prompt_ids, f) for f in fulls)
    comps = [f[n:] for f in fulls]
    if not all(comps):
        raise ValueError("a completion has no tokens of its own after the prompt")
    return prompt_ids[:n], comps, n < len(prompt_ids)


def tokenize_trl(
    tokenizer: ChatTokenizer,
    prompt: str | list[dict],
    completions: Sequence[str | list[dict]],
    *,
    append_eos: bool = True,
) -> tuple[list[int], list[list[int]], bool]:
    """``(prompt_ids, completion_ids, shifted)`` as TRL 1.16's DPOTrainer tokenizes a row (module
    docstring); ``shifted``: the prompt lost tokens to the completions at the boundary."""
    texts, special = trl_texts(tokenizer, prompt, completions, append_eos=append_eos)
    return trl_split([tokenizer.encode(t, add_special_tokens=special) for t in texts])


def truncate(
    prompt: list[int],
    completions: list[list[int]],
    *,
    max_length: int | None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_start",
    where: str = "",
    stats: DataStats | None = None,
) -> tuple[list[int], list[list[int]]]:
    """Cuts the prompt to ``max_prompt_length`` (its end), the completions to
    ``max_completion_length`` (their starts), then prompt+completion to ``max_length`` by
    ``truncation_mode`` (module docstring). Raises DataError(prompt_too_long) when nothing of a
    completion (``keep_start``) or of the prompt (``keep_end``) would remain."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(
            f"data.truncation_mode must be one of {list(TRUNCATION_MODES)}, got {truncation_mode!r}"
        )
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        if stats is not None:
            stats.truncated_prompts += 1
    if max_completion_length is not None:
        cut = [c[:max_completion_length] for c in completions]
        if stats is not None:
            stats.truncated_completions += sum(len(a) < len(b) for a, b in zip(cut, completions))
        completions = cut
    if max_length is None:
        return prompt, completions
    if truncation_mode == "keep_end":
        excess = len(prompt) + max(len(c) for c in completions) - max_length
        if excess <= 0:
            return prompt, completions
        if excess >= len(prompt):
            raise DataError(
                where,
                REASON_PROMPT_TOO_LONG,
                f"a completion has {max(len(c) for c in completions)} tokens, leaving no room for the "
                f"prompt within data.max_length={max_length} (truncation_mode keep_end; set "
                "data.max_completion_length to cut completions)",
            )
        if stats is not None:
            stats.truncated_prompts += 1
        return prompt[excess:], completions
    if len(prompt) >= max_length:
        hint = "" if max_prompt_length is not None else "; set data.max_prompt_length to cut the prompt"
        raise DataError(
            where,
            REASON_PROMPT_TOO_LONG,
            f"prompt has {len(prompt)} tokens, leaving no room for a completion within "
            f"data.max_length={max_length}{hint}",
        )
    room = max_length - len(prompt)
    if stats is not None:
        stats.truncated_completions += sum(len(c) > room for c in completions)
    return prompt, [c[:room] for c in completions]


_SCALAR_KEYS = ("label", "user_id", "scores", *BATCH_FLOAT_FIELDS)
# The rationale's conditioning text after the prompt (Rationale-DPO's log pi(r | x, y_w > y_l); the
# paper gives no template, so this one states which response was preferred).
RATIONALE_TEMPLATE = (
    "\n\nPreferred response:\n{chosen}\n\nOther response:\n{rejected}\n\n"
    "Why the preferred response is better:\n"
)


def _completions(record: Mapping[str, Any]) -> list[Any]:
    if "chosen" in record:
        return [record["chosen"], record["rejected"]]
    if "candidates" in record:
        return list(record["candidates"])
    return [record["completion"]]


@dataclasses.dataclass
class Row:
    """One record's tokenization: the example or the DataError that drops it, and what it added to
    the truncation/boundary counters of :class:`DataStats` (a dropped row may have added some)."""

    result: TokenizedExample | DataError
    truncated_prompts: int = 0
    truncated_completions: int = 0
    boundary_shifts: int = 0

    def add_to(self, stats: DataStats) -> None:
        stats.truncated_prompts += self.truncated_prompts
        stats.truncated_completions += self.truncated_completions
        stats.boundary_shifts += self.boundary_shifts


Encoded = tuple[list[int], list[list[int]], bool]


def plain_text(value: str | list[dict]) -> str:
    """A string as it is; chat messages as their contents joined by newlines."""
    return value if isinstance(value, str) else "\n".join(str(m.get("content", "")) for m in value)


def _rationale_completion(
    record: Mapping[str, Any],
    tokenizer: ChatTokenizer,
    template: str,
    room: int | None,
    where: str,
) -> tuple[list[int], int]:
    """The rationale sequence after the shared prompt: (template ids + rationale ids + EOS, prefix)."""
    if "rationale" not in record:
        raise DataError(where, REASON_MISSING, "missing field 'rationale' (the loss reads rationale_logps)")
    text = template.format(chosen=plain_text(record["chosen"]), rejected=plain_text(record["rejected"]))
    try:
        prefix = tokenizer.encode(text, add_special_tokens=False)
        body = tokenizer.encode(record["rationale"], add_special_tokens=False) + [tokenizer.eos_id]
    except ValueError as e:
        raise DataError(where, REASON_TYPE, f"rationale: {e}") from None
    if room is not None:
        if len(prefix) >= room:
            raise DataError(
                where,
                REASON_PROMPT_TOO_LONG,
                "the rationale sequence's prompt and responses (data.rationale_template) fill "
                "data.max_length, leaving no room for the rationale; raise data.max_length",
            )
        body = body[: room - len(prefix)]
    return prefix + body, len(prefix)


def _degraded_completions(
    record: Mapping[str, Any], tokenizer: ChatTokenizer, removals: int, room: int | None, where: str
) -> tuple[list[list[int]], list[int]]:
    """SPO's two degraded responses after the shared prompt (ids + EOS each) and their labels."""
    chosen, rejected = plain_text(record["chosen"]), plain_text(record["rejected"])
    texts, labels = degrees.degraded_pair(chosen, rejected, removals)
    try:
        ids = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_id] for t in texts]
    except ValueError as e:
        raise DataError(where, REASON_TYPE, f"degraded responses: {e}") from None
    if room is not None:
        ids = [i[:room] for i in ids]
    return ids, labels


def _finish(
    record: Mapping[str, Any],
    encoded: Encoded | list[Encoded] | ValueError,
    *,
    where: str,
    max_length: int | None,
    max_prompt_length: int | None,
    max_completion_length: int | None,
    truncation_mode: str,
    tokenizer: ChatTokenizer | None = None,
    rationale_template: str | None = None,
    degree_removals: int | None = None,
) -> Row:
    """Truncation, the identical-after-truncation check and the extras of an encoded record
    (``encoded`` is a list of one encoding per side for DOVE rows, see the module docstring)."""
    if isinstance(encoded, ValueError):
        return Row(DataError(where, REASON_TYPE, str(encoded)))
    sides = encoded if isinstance(encoded, list) else [encoded]
    stats = DataStats()
    row = Row(DataError(where, REASON_TYPE, ""), boundary_shifts=int(any(s[2] for s in sides)))
    try:
        cut = [
            truncate(
                p_ids,
                c_ids,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                max_completion_length=max_completion_length,
                truncation_mode=truncation_mode,
                where=where,
                stats=stats,
            )
            for p_ids, c_ids, _ in sides
        ]
        extras = {k: record[k] for k in _SCALAR_KEYS if k in record}
        if len(cut) == 1:
            (p_ids, c_ids), untruncated = cut[0], sides[0][1]
        else:  # each side's own instruction becomes the prefix of its completion
            p_ids, c_ids = [], [p + c[0] for p, c in cut]
            untruncated = [p + c[0] for p, c, _ in sides]
            extras["prefix_lengths"] = [len(p) for p, _ in cut]
        if "chosen" in record and c_ids[0] == c_ids[1] and untruncated[0] != untruncated[1]:
            raise DataError(
                where,
                REASON_IDENTICAL_AFTER_TRUNCATION,
                f"chosen and rejected are identical after truncation to data.max_length={max_length}",
            )
        if rationale_template is not None and "chosen" in record:
            if tokenizer is None:
                raise ValueError("rationale sequences need the tokenizer")
            room = None if max_length is None else max_length - len(p_ids)
            ids, prefix = _rationale_completion(record, tokenizer, rationale_template, room, where)
            c_ids = [*c_ids, ids]
            extras["prefix_lengths"] = [*extras.get("prefix_lengths", [0] * 2), prefix]
        if degree_removals is not None and "chosen" in record:
            if tokenizer is None:
                raise ValueError("degraded responses need the tokenizer")
            room = None if max_length is None else max_length - len(p_ids)
            ids, labels = _degraded_completions(record, tokenizer, degree_removals, room, where)
            c_ids = [*c_ids, *ids]
            if "prefix_lengths" in extras:
                extras["prefix_lengths"] = [*extras["prefix_lengths"], 0, 0]
            extras["degree_labels"] = labels
        row.result = TokenizedExample(p_ids, c_ids, extras, where)
    except DataError as e:
        row.result = e
    row.truncated_prompts, row.truncated_completions = stats.truncated_prompts, stats.truncated_completions
    return row


def _check_options(tokenization: str, truncation_mode: str) -> None:
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"data.tokenization must be one of {list(TOKENIZATIONS)}, got {tokenization!r}")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(
            f"data.truncation_mode must be one of {list(TRUNCATION_MODES)}, got {truncation_mode!r}"
        )


def _encode_sides(tokenizer: ChatTokenizer, record: Mapping[str, Any], tokenization: str) -> list[Encoded]:
    """A DOVE row's two sides, each encoded as a row of its own with its instruction as the prompt."""
    out = []
    for side, prompt_field in zip(("chosen", "rejected"), OWN_PROMPTS):
        one = {"prompt": record[prompt_field], "completion": record[side]}
        one.update({k: record[k] for k in ("append_eos",) if k in record})
        out.append(_encode(tokenizer, one, tokenization))
    return out


def _encode(tokenizer: ChatTokenizer, record: Mapping[str, Any], tokenization: str) -> Encoded:
    if tokenization == "trl":
        return tokenize_trl(
            tokenizer, record["prompt"], _completions(record), append_eos=record.get("append_eos", True)
        )
    return _encode_joint(tokenizer, record)


def _encode_joint(tokenizer: ChatTokenizer, record: Mapping[str, Any]) -> Encoded:
    prompt, append_eos = record["prompt"], record.get("append_eos", True)
    before = tokenizer.boundary_fallbacks
    p_ids = tokenizer.encode_prompt(prompt)
    c_ids = [
        tokenizer.encode_completion(prompt, c, p_ids, append_eos=append_eos) for c in _completions(record)
    ]
    return p_ids, c_ids, tokenizer.boundary_fallbacks > before


def tokenize_rows(
    records: Sequence[Mapping[str, Any]],
    wheres: Sequence[str],
    tokenizer: ChatTokenizer,
    *,
    tokenization: str = "trl",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_start",
    rationale_template: str | None = None,
    degree_removals: int | None = None,
) -> list[Row]:
    """:func:`tokenize_record` of many records at once: every text of the chunk goes through one
    batched, multi-threaded ``encode_batch`` per special-token setting; the ids are those of the
    per-row path. Bad rows come back as DataErrors in their :class:`Row`, never raised."""
    _check_options(tokenization, truncation_mode)
    encoded: list[Any] = [None] * len(records)
    pending: dict[bool, list[tuple[int, int, str]]] = {True: [], False: []}  # (record, slot, text)
    spans: list[int] = [0] * len(records)
    for i, rec in enumerate(records):
        try:
            if OWN_PROMPTS[0] in rec:
                encoded[i] = _encode_sides(tokenizer, rec, tokenization)
                continue
            if tokenization == "joint":
                encoded[i] = _encode_joint(tokenizer, rec)
                continue
            texts, special = trl_texts(
                tokenizer, rec["prompt"], _completions(rec), append_eos=rec.get("append_eos", True)
            )
        except ValueError as e:
            encoded[i] = e
            continue
        spans[i] = len(texts)
        pending[special].extend((i, j, t) for j, t in enumerate(texts))
    ids: dict[int, list[Any]] = {i: [None] * spans[i] for i in range(len(records)) if spans[i]}
    for special, items in pending.items():
        for (i, j, _), out in zip(items, tokenizer.encode_batch([t for _, _, t in items], special)):
            ids[i][j] = out
    for i, parts in ids.items():
        failed = next((p for p in parts if isinstance(p, ValueError)), None)  # the per-row path's first
        if failed is not None:
            encoded[i] = failed
            continue
        try:
            encoded[i] = trl_split(parts)
        except ValueError as e:
            encoded[i] = e
    return [
        _finish(
            rec,
            enc,
            where=where,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            max_completion_length=max_completion_length,
            truncation_mode=truncation_mode,
            tokenizer=tokenizer,
            rationale_template=rationale_template,
            degree_removals=degree_removals,
        )
        for rec, enc, where in zip(records, encoded, wheres)
    ]


def tokenize_record(
    record: Mapping[str, Any],
    tokenizer: ChatTokenizer,
    *,
    tokenization: str = "trl",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_start",
    rationale_template: str | None = None,
    degree_removals: int | None = None,
    where: str = "",
    stats: DataStats | None = None,
) -> TokenizedExample:
    """Tokenizes a validated record (any kind) into a TokenizedExample; errors name ``where``.
    A pair whose completions are identical after truncation raises DataError
    (``identical_after_truncation``)."""
    _check_options(tokenization, truncation_mode)
    enc: Any
    try:
        if OWN_PROMPTS[0] in record:
            enc = _encode_sides(tokenizer, record, tokenization)
        else:
            enc = _encode(tokenizer, record, tokenization)
    except ValueError as e:
        enc = e
    row = _finish(
        record,
        enc,
        where=where,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        truncation_mode=truncation_mode,
        tokenizer=tokenizer,
        rationale_template=rationale_template,
        degree_removals=degree_removals,
    )
    if stats is not None:
        row.add_to(stats)
    if isinstance(row.result, DataError):
        raise row.result
    return row.result
