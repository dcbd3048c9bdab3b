"""Preference record schema and validation.

Records are plain dicts. Five kinds are understood (``kind=`` everywhere in alignjax.data):

* ``pairwise``: ``prompt``, ``chosen``, ``rejected``. Each is a string, or a list of chat messages
  ``{"role", "content"}``. When ``prompt`` is absent and ``chosen``/``rejected`` are full
  conversations, the longest common message prefix becomes the prompt (as TRL's
  ``extract_prompt`` does). Rows whose two sides have their own instruction (DOVE's joint
  preferences, "Comparing Bad Apples to Good Oranges", arXiv 2404.00530) give ``chosen_prompt``
  and ``rejected_prompt`` instead of ``prompt``.
* ``step``: pairwise plus ``chosen_visits``, ``rejected_visits`` (MCTS visit counts, numbers).
* ``unpaired``: ``prompt``, ``completion``, ``label`` (bool: desirable or not; KTO/BCO style).
  A preference row (``chosen``/``rejected``) read as ``unpaired`` becomes two, as TRL's
  ``unpair_preference_dataset`` does (:func:`unpair`).
* ``sft``: ``prompt``, ``completion``.
* ``listwise``: ``prompt``, ``candidates`` (list of >= 2 completions), ``scores`` (one number each).

Optional per-example extras, carried into batches as ``[B]`` arrays: ``margin``, ``score``,
``weight``, ``user_id`` (int), ``ref_chosen_logps``, ``ref_rejected_logps``, InfiFPO's ``source_logps``
(``[chosen, rejected]`` or ``{"chosen", "rejected"}``, each a number or a list of one number per
source model, the same N on every row; batched ``[B, N]``; stored as ``source_chosen_logps`` /
``source_rejected_logps``), GPO's win probabilities against the current policy ``chosen_probs_win``
= P(y_w > pi_t) and ``chosen_probs_lose`` = P(y_l > pi_t) (each in [0, 1], and they
need not sum to one; SPPO's and GPO's names), BCO's ``prompt_desirable_prob`` (in [0, 1]: a prompt
classifier's probability that the prompt is from the desirable set), and Sem-DPO's
``semantic_distance`` (>= 0: 1 - cos of sentence embeddings of the prompt and y_w, computed
offline). ``rationale`` and ``subset`` (RewardBench's subset name) are strings kept on the record
(a loss reading ``rationale_logps`` makes the rationale a sequence of its batch; see
:mod:`alignjax.data.tokenize`). ``append_eos`` (bool, default true)
set to false keeps completions as written: partial solutions such as one reasoning step of MCTS-DPO,
which the model continues after, get no EOS (a completion whose text ends with the EOS token keeps
it).

Every problem raises :class:`DataError` whose message starts with ``"<file>:<line>: "`` (line is
1-based; for non-line sources the record number). With ``on_bad_row="skip"`` the row is dropped and
counted by reason in :class:`DataStats` instead: nothing is dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

KINDS = ("pairwise", "step", "unpaired", "sft", "listwise")
OWN_PROMPTS = ("chosen_prompt", "rejected_prompt")  # DOVE: each side of a pair has its own instruction
# Probabilities in [0, 1]: each response's probability of beating the current policy (GPO / SPPO),
# named as the official SPPO and GPO data scripts write them (``compute_prob.py``:
# ``chosen_probs_win`` = P(y_w > pi_t), ``chosen_probs_lose`` = P(y_l > pi_t)).
# BCO's underlying-distribution matching: a prompt classifier's probability that the prompt comes
# from the desirable set (TRL fits a logistic regression on prompt embeddings), computed offline.
PROBABILITY_EXTRAS = ("chosen_probs_win", "chosen_probs_lose", "prompt_desirable_prob")
# Distances, >= 0: Sem-DPO's cosine distance of sentence embeddings, 1 - cos(e(x), e(y_w)), in [0, 2].
DISTANCE_EXTRAS = ("semantic_distance",)
FLOAT_EXTRAS = (
    "margin",
    "score",
    "weight",
    "ref_chosen_logps",
    "ref_rejected_logps",
    *PROBABILITY_EXTRAS,
    *DISTANCE_EXTRAS,
)
# Per-example float arrays a batch carries: the extras above plus the ones derived from records
# (``source_logps`` split in two; the ``step`` kind's visit counts).
BATCH_FLOAT_FIELDS = (
    *FLOAT_EXTRAS,
    "source_chosen_logps",
    "source_rejected_logps",
    "chosen_visits",
    "rejected_visits",
)
INT_EXTRAS = ("user_id",)

# Reason keys used in DataStats.skipped (stable: the run summary prints them).
REASON_NOT_JSON = "not_json"
REASON_INVALID_UTF8 = "invalid_utf8"
REASON_MISSING = "missing_field"
REASON_EMPTY = "empty_field"
REASON_TYPE = "wrong_type"
REASON_IDENTICAL = "chosen_equals_rejected"
REASON_PROMPT_TOO_LONG = "prompt_too_long"
REASON_BAD_VALUE = "bad_value"
REASON_UNKNOWN_ROLE = "unknown_role"
# A pair whose chosen and rejected ids are equal once cut to the length settings: it carries no
# preference, so it is skipped whatever on_bad_row says (the data is fine, the settings made it so).
REASON_IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
ALWAYS_SKIP = (REASON_IDENTICAL_AFTER_TRUNCATION,)

# Message roles a chat row may use: the union of what the chat templates of the supported model
# families (Llama 3, Mistral, Qwen2/3, ChatML) and OpenAI-style data know.
ROLES = ("system", "developer", "user", "assistant", "tool")


class DataError(ValueError):
    """A malformed data row. ``where`` is ``"file:line"``; ``reason`` one of the REASON_* keys."""

    def __init__(self, where: str, reason: str, problem: str):
        self.where, self.reason, self.problem = where, reason, problem
        super().__init__(f"{where}: {problem}")


@dataclasses.dataclass
class DataStats:
    """Counts of rows read, kept and skipped (by reason), plus padding share of produced batches.

    ``summary()`` returns a flat dict of scalars with stable names for the run summary.
    """

    rows_read: int = 0
    rows_kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)  # first few skip messages
    tokens_real: int = 0
    tokens_total: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0
    # Rows whose tokenized prompt is not a prefix of prompt+completion (a token straddles the boundary).
    boundary_shifts: int = 0
    # Validated records equal to an earlier one of the same source (counted, kept).
    duplicates: int = 0

    max_examples = 20

    def skip(self, err: DataError) -> None:
        self.skipped[err.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def padding_fraction(self) -> float:
        """Share of batch tokens that are padding: ``1 - real / total`` over all batches produced."""
        return 0.0 if self.tokens_total == 0 else 1.0 - self.tokens_real / self.tokens_total

    def summary(self) -> dict[str, float]:
        out = {
            "data/rows_read": self.rows_read,
            "data/rows_kept": self.rows_kept,
            "data/rows_skipped": self.rows_skipped,
            "data/truncated_prompts": self.truncated_prompts,
            "data/truncated_completions": self.truncated_completions,
            "data/boundary_shifts": self.boundary_shifts,
            "data/duplicates": self.duplicates,
            "data/identical_after_truncation": self.skipped.get(REASON_IDENTICAL_AFTER_TRUNCATION, 0),
            "data/padding_fraction": self.padding_fraction,
        }
        out.update({f"data/skipped/{k}": v for k, v in sorted(self.skipped.items())})
        return out


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) for m in value)


def _check_text(value: Any, field: str, where: str, *, allow_messages: bool = True) -> Any:
    """A field must be a non-empty string or a non-empty list of {role, content} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(where, REASON_EMPTY, f"field {field!r} is empty")
        return value
    if allow_messages and isinstance(value, list):
        if not value:
            raise DataError(where, REASON_EMPTY, f"field {field!r} is empty")
        out = []
        for j, msg in enumerate(value):
            if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
                raise DataError(
                    where,
                    REASON_TYPE,
                    f"field {field!r} message {j} must be a dict with 'role' and 'content'",
                )
            if not isinstance(msg["role"], str) or not isinstance(msg["content"], str):
                raise DataError(
                    where, REASON_TYPE, f"field {field!r} message {j} role/content must be strings"
                )
            if msg["role"] not in ROLES:
                raise DataError(
                    where,
                    REASON_UNKNOWN_ROLE,
                    f"field {field!r} message {j} has role {msg['role']!r}; allowed roles: "
                    + ", ".join(ROLES),
                )
            out.append({"role": msg["role"], "content": msg["content"]})
        return out
    kinds = "a string or a list of chat messages" if allow_messages else "a string"
    raise DataError(where, REASON_TYPE, f"field {field!r} must be {kinds}, got {type(value).__name__}")


def _require(raw: Mapping[str, Any], field: str, where: str) -> Any:
    if field not in raw or raw[field] is None:
        raise DataError(where, REASON_MISSING, f"missing field {field!r}")
    return raw[field]


def _number(value: Any, field: str, where: str, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(where, REASON_TYPE, f"field {field!r} must be a number, got {type(value).__name__}")
    if kind is int and float(value) != int(value):
        raise DataError(where, REASON_TYPE, f"field {field!r} must be an integer, got {value!r}")
    return kind(value)


def _numbers(value: Any, field: str, where: str) -> list[float]:
    """A number or a non-empty list of numbers, as a list."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise DataError(where, REASON_EMPTY, f"field {field!r} is an empty list")
    names = [f"{field}[{j}]" for j in range(len(values))] if isinstance(value, list) else [field]
    return [_number(v, name, where) for v, name in zip(values, names)]


def split_common_prefix(
    chosen: list[dict], rejected: list[dict]
) -> tuple[list[dict], list[dict], list[dict]]:
    """Implicit prompt: the longest common message prefix of two conversations (TRL extract_prompt).

    Returns ``(prompt, chosen_rest, rejected_rest)``.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def validate_record(raw: Any, kind: str, where: str) -> dict[str, Any]:
    """Checks one raw row and returns a normalised record; raises DataError naming ``where``.

    Normalisation: an absent prompt on conversational pairs is split off as the common prefix;
    ``source_logps`` is split into ``source_chosen_logps``/``source_rejected_logps``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; valid kinds are {list(KINDS)}")
    if not isinstance(raw, Mapping):
        raise DataError(where, REASON_TYPE, f"row must be a JSON object, got {type(raw).__name__}")
    rec: dict[str, Any] = {}
    if kind in ("pairwise", "step"):
        chosen = _check_text(_require(raw, "chosen", where), "chosen", where)
        rejected = _check_text(_require(raw, "rejected", where), "rejected", where)
        if kind == "pairwise" and any(raw.get(f) is not None for f in OWN_PROMPTS):
            rec.update(_own_prompts(raw, chosen, rejected, where))
            prompt = None
        elif raw.get("prompt") is None:
            if not (_is_messages(chosen) and _is_messages(rejected)):
                raise DataError(where, REASON_MISSING, "missing field 'prompt'")
            prompt, chosen, rejected = split_common_prefix(chosen, rejected)
            if not prompt:
                raise DataError(
                    where, REASON_MISSING, "missing field 'prompt' and chosen/rejected share no common prefix"
                )
        else:
            prompt = _check_text(raw["prompt"], "prompt", where)
        if isinstance(chosen, list) and not chosen or isinstance(rejected, list) and not rejected:
            raise DataError(where, REASON_EMPTY, "chosen/rejected have no messages after the shared prompt")
        if chosen == rejected and rec.get("chosen_prompt") == rec.get("rejected_prompt"):
            raise DataError(where, REASON_IDENTICAL, "chosen is identical to rejected")
        sides = (rec["chosen_prompt"], chosen, rec["rejected_prompt"], rejected) if prompt is None else (
            prompt, chosen, rejected)
        if len({_is_messages(v) for v in sides}) > 1:
            names = "chosen_prompt, chosen, rejected_prompt, rejected" if prompt is None else (
                "prompt, chosen and rejected")
            raise DataError(where, REASON_TYPE, f"{names} must all be strings or all messages")
        rec.update(chosen=chosen, rejected=rejected)
        if prompt is not None:
            rec["prompt"] = prompt
        if kind == "step":
            for field in ("chosen_visits", "rejected_visits"):
                rec[field] = _number(_require(raw, field, where), field, where)
    elif kind in ("unpaired", "sft"):
        rec["prompt"] = _check_text(_require(raw, "prompt", where), "prompt", where)
        rec["completion"] = _check_text(_require(raw, "completion", where), "completion", where)
        if _is_messages(rec["prompt"]) != _is_messages(rec["completion"]):
            raise DataError(where, REASON_TYPE, "prompt and completion must both be strings or both messages")
        if kind == "unpaired":
            label = _require(raw, "label", where)
            if not isinstance(label, bool):
                raise DataError(
                    where, REASON_TYPE, f"field 'label' must be a bool, got {type(label).__name__}"
                )
            rec["label"] = label
    else:  # listwise
        rec["prompt"] = _check_text(_require(raw, "prompt", where), "prompt", where)
        cands = _require(raw, "candidates", where)
        if not isinstance(cands, list):
            raise DataError(
                where, REASON_TYPE, f"field 'candidates' must be a list, got {type(cands).__name__}"
            )
        if len(cands) < 2:
            raise DataError(
                where, REASON_BAD_VALUE, f"field 'candidates' needs at least 2 entries, got {len(cands)}"
            )
        rec["candidates"] = [_check_text(c, f"candidates[{j}]", where) for j, c in enumerate(cands)]
        scores = _require(raw, "scores", where)
        if not isinstance(scores, list):
            raise DataError(where, REASON_TYPE, f"field 'scores' must be a list, got {type(scores).__name__}")
        if len(scores) != len(cands):
            raise DataError(
                where,
                REASON_BAD_VALUE,
                f"field 'scores' has {len(scores)} entries but 'candidates' has {len(cands)}",
            )
        rec["scores"] = [_number(s, f"scores[{j}]", where) for j, s in enumerate(scores)]

    for field in FLOAT_EXTRAS:
        if raw.get(field) is not None:
            rec[field] = _number(raw[field], field, where)
    for field in PROBABILITY_EXTRAS:
        if field in rec and not 0.0 <= rec[field] <= 1.0:  # (NaN fails too)
            raise DataError(where, REASON_BAD_VALUE, f"field {field!r} must be a probability in [0, 1], "
                            f"got {rec[field]!r}")
    for field in DISTANCE_EXTRAS:
        if field in rec and not 0.0 <= rec[field] < float("inf"):
            raise DataError(where, REASON_BAD_VALUE, f"field {field!r} must be a finite distance >= 0, "
                            f"got {rec[field]!r}")
    for field in INT_EXTRAS:
        if raw.get(field) is not None:
            rec[field] = _number(raw[field], field, where, int)
    for key in ("rationale", "subset"):
        if raw.get(key) is not None:
            rec[key] = _check_text(raw[key], key, where, allow_messages=False)
    if raw.get("append_eos") is not None:
        if not isinstance(raw["append_eos"], bool):
            raise DataError(where, REASON_TYPE, "field 'append_eos' must be true or false")
        rec["append_eos"] = raw["append_eos"]
    if raw.get("source_logps") is not None:
        src = raw["source_logps"]
        if isinstance(src, Mapping) and "chosen" in src and "rejected" in src:
            pair = (src["chosen"], src["rejected"])
        elif isinstance(src, list) and len(src) == 2:
            pair = tuple(src)
        else:
            raise DataError(
                where,
                REASON_TYPE,
                "field 'source_logps' must be [chosen, rejected] or {'chosen': .., 'rejected': ..}",
            )
        chosen = _numbers(pair[0], "source_logps.chosen", where)
        rejected = _numbers(pair[1], "source_logps.rejected", where)
        if len(chosen) != len(rejected):
            raise DataError(where, REASON_BAD_VALUE, f"field 'source_logps' has {len(chosen)} chosen but "
                            f"{len(rejected)} rejected values (one per source model each)")
        rec["source_chosen_logps"], rec["source_rejected_logps"] = chosen, rejected
    return rec


def _own_prompts(raw: Mapping[str, Any], chosen: Any, rejected: Any, where: str) -> dict[str, Any]:
    """A DOVE row's per-side instructions; a shared ``prompt`` next to them would be ambiguous."""
    if raw.get("prompt") is not None:
        raise DataError(
            where, REASON_TYPE, "give either 'prompt' or 'chosen_prompt' + 'rejected_prompt', not both"
        )
    return {f: _check_text(_require(raw, f, where), f, where) for f in OWN_PROMPTS}


def is_pair_row(raw: Any) -> bool:
    """A preference row (``chosen`` and ``rejected``, no ``completion``)."""
    return isinstance(raw, Mapping) and "chosen" in raw and "rejected" in raw and "completion" not in raw


def unpair(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A validated pairwise record as two unpaired ones (TRL ``unpair_preference_dataset``): the
    chosen completion with ``label=True``, the rejected with ``label=False``; extras are copied."""
    rest = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
    return [
        dict(rest, completion=record["chosen"], label=True),
        dict(rest, completion=record["rejected"], label=False),
    ]


def parse_json_line(line: str, where: str) -> Any:
    """``json.loads`` with a DataError naming ``where`` on failure."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(where, REASON_NOT_JSON, f"not valid JSON ({e.msg} at column {e.colno})") from None


def record_key(record: Mapping[str, Any]) -> bytes:
    """An 8-byte digest of a validated record's content (duplicate counting)."""
    import hashlib

    text = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
