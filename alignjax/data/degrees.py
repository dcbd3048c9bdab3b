"""SPO's self-supervised preference degrees: responses with part of their key content removed.

"Self-supervised Preference Optimization: Enhance Your Language Model with Preference Degree
Awareness" (Li et al., EMNLP Findings 2024, arXiv:2409.17791) extracts a response's key content with
RAKE (Rapid Automatic Keyword Extraction, Rose et al. 2010), removes varying amounts of it, and
trains a classifier on the policy to tell how much was removed, alongside the alignment loss.

Choices where the paper leaves them open (its repository holds no code):

* Key content: the RAKE phrases of ``python-rake`` with its SMART stop list, ranked by score (ties
  by first occurrence); numbers stay in phrases but score 0, as RAKE defines.
* Degrees: for each pair, ``r_w, r_l`` in ``0..removals``, drawn per row from a hash of its text (the
  same row always gets the same degrees, so the tokenized cache and a resumed run agree); the top
  ``r`` phrases are removed, at most all but one (a response keeps some content), and the label is
  the number actually removed.
* Classes: ``side * (removals + 1) + r``, so the classifier sees which side of the pair a degraded
  response came from as well as its degree (``2 (removals + 1)`` classes).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from RAKE import Rake, SmartStopList

DEFAULT_REMOVALS = 2

_RAKE = Rake(SmartStopList())


def num_classes(degree_removals: int) -> int:
    """Classes of the degree classifier: (chosen, rejected) x (0..degree_removals phrases removed)."""
    return 2 * (int(degree_removals) + 1)


def key_phrases(text: str) -> list[str]:
    """The RAKE phrases of ``text``, best first (lower-cased, as RAKE returns them)."""
    ranked = _RAKE.run(text)
    order = {p: text.lower().find(p) for p, _ in ranked}
    return [p for p, _ in sorted(ranked, key=lambda ps: (-ps[1], order[ps[0]]))]


def remove_phrases(text: str, phrases: Sequence[str]) -> str:
    """``text`` without every occurrence of ``phrases`` (whole words, any case), spaces tidied (its
    leading whitespace kept: a completion's first space belongs to its first token)."""
    out = text
    for phrase in phrases:
        out = re.sub(rf"(?<!\w){re.escape(phrase)}(?!\w)", "", out, flags=re.IGNORECASE)
    out = re.sub(r"[ \t]+([.,;:!?])", r"\1", re.sub(r"[ \t]{2,}", " ", out)).strip()
    return text[: len(text) - len(text.lstrip())] + out


def degrade(text: str, removals: int) -> tuple[str, int]:
    """``text`` with its ``removals`` best key phrases removed (at most all but one) and how many were."""
    phrases = key_phrases(text)
    r = max(0, min(int(removals), len(phrases) - 1))
    return remove_phrases(text, phrases[:r]), r


def row_degrees(chosen: str, rejected: str, removals: int) -> tuple[int, int]:
    """The degrees ``(r_w, r_l)`` in ``0..removals`` a pair is degraded by: a hash of its texts."""
    digest = hashlib.sha256(f"{chosen}\x00{rejected}".encode()).digest()
    return digest[0] % (removals + 1), digest[1] % (removals + 1)


def degraded_pair(chosen: str, rejected: str, removals: int) -> tuple[list[str], list[int]]:
    """The pair's two degraded responses and their class labels (see the module docstring)."""
    targets = row_degrees(chosen, rejected, removals)
    texts, labels = [], []
    for side, (text, target) in enumerate(zip((chosen, rejected), targets)):
        degraded, r = degrade(text, target)
        texts.append(degraded)
        labels.append(side * (removals + 1) + r)
    return texts, labels
