"""Reward-augmented relabelling of preference pairs ("Reward-Augmented Data Enhances Direct Preference
Alignment of LLMs", Zhang et al., arXiv:2410.08067), as the authors' ``scripts/reward_augmentation.py``:

pairs whose chosen score is below the rejected one are dropped; every remaining pair appears twice,
its prompt conditioned on a target score -- once on the chosen response's score with the pair as it
is, once on the rejected response's score with the two responses swapped (the response that achieves
the asked-for score is the preferred one) -- all score-``r_w`` pairs first, then all score-``r_l``
ones. The condition is :func:`system_prompt`: a system message before a conversational prompt (the
authors' main variant), or that text and a blank line before a string prompt (their ``nosys``
variant). A score that is an integer is written without a decimal point.

Usable offline (``relabel(records)`` on TRL-format ``prompt``/``chosen``/``rejected`` rows carrying
``score_chosen`` / ``score_rejected``) and online (``config.online.reward_augmented`` of the
``online_dpo`` job: each round's pairs, scored by the reward source, are relabelled before training).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

SCORE_KEYS = ("score_chosen", "score_rejected")


def system_prompt(score: float) -> str:
    """The authors' target-score instruction (scale 1-10)."""
    score = int(score) if int(score) == score else score
    return ("You are an assistant that generates responses for the instruction while implicitly achieving "
            "the following target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):\n"
            f"Overall score: {score}.")


def format_score(score: float) -> str:
    """An integral score without a decimal point (the authors' formatting)."""
    return str(int(score) if int(score) == score else score)


def condition(prompt: Any, score: float, prefix: str = "") -> Any:
    """``prompt`` conditioned on ``score``: a system message first (messages) or the text before it.
    ``prefix`` (a format string with ``{score}``; "" = the authors' :func:`system_prompt` and a blank
    line) replaces the condition of a string prompt, e.g. for a tokenizer with a small alphabet."""
    if isinstance(prompt, str):
        head = prefix.format(score=format_score(score)) if prefix else system_prompt(score) + "\n\n"
        return head + prompt
    return [{"role": "system", "content": system_prompt(score)}, *copy.deepcopy(list(prompt))]


def relabel(records: Sequence[dict[str, Any]], *, keys: tuple[str, str] = SCORE_KEYS, prefix: str = ""
            ) -> list[dict[str, Any]]:
    """The reward-augmented rows of ``records`` (see the module docstring); other columns are kept and
    the score columns are dropped. A row without its scores is an error naming the row and the key."""
    kept = []
    for i, r in enumerate(records):
        for k in keys:
            if k not in r:
                raise ValueError(f"record {i}: no {k!r} (reward-augmented relabelling needs both scores)")
        if float(r[keys[0]]) >= float(r[keys[1]]):
            kept.append(r)
    rest = lambda r: {k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected", *keys)}
    positive = [{**rest(r), "prompt": condition(r["prompt"], r[keys[0]], prefix), "chosen": r["chosen"],
                 "rejected": r["rejected"]} for r in kept]
    negative = [{**rest(r), "prompt": condition(r["prompt"], r[keys[1]], prefix), "chosen": r["rejected"],
                 "rejected": r["chosen"]} for r in kept]
    return positive + negative
