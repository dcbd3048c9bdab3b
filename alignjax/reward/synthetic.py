"""Synthetic reward-model sets with known answers, on the arithmetic tokenizer's digits.

* :func:`linear_bt_pairs`: responses are digit strings; the true reward is linear in the digit
  counts, r(y) = sum_t w[y_t]; each pair's label is *sampled* from a Bradley-Terry model with that
  reward, P(a > b) = sigmoid(r(a) - r(b)). The accuracy ceiling on a labelled set is the accuracy of
  the true reward itself on those labels (no model can do better in expectation).
* :func:`cyclic_pairs`: intransitive preferences, rock-paper-scissors over three response types
  (a type digit followed by random filler): type 0 > type 1 > type 2 > type 0. A scalar reward gets at
  most 2 of the 3 pair types right, and Bradley-Terry's optimum on a balanced cycle is equal rewards
  (chance); GPM's skew-symmetric score represents the cycle exactly.

Rows are RewardBench-style dicts (``prompt``, ``chosen``, ``rejected``, ``subset``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

PROMPT = "+="


def linear_weights(seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """w[d] for digits 0..9 (fixed, seeded)."""
    return scale * np.random.default_rng(seed).normal(size=10)


def linear_bt_pairs(
    n: int, *, weights: np.ndarray, length: int = 4, seed: int = 0, noise: float = 0.0
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """``n`` pairs with BT-sampled labels; ``noise`` flips that share of labels on top (injected
    annotation noise). Returns (rows, true reward difference r(chosen) - r(rejected) [n])."""
    rng = np.random.default_rng(seed)
    rows, diffs = [], []
    while len(rows) < n:
        a, b = rng.integers(0, 10, size=(2, length))
        if np.array_equal(a, b):
            continue
        d = float(weights[a].sum() - weights[b].sum())
        if rng.random() >= 1.0 / (1.0 + np.exp(-d)):  # b wins
            a, b, d = b, a, -d
        if rng.random() < noise:
            a, b, d = b, a, -d
        rows.append(
            {
                "prompt": PROMPT,
                "chosen": "".join(map(str, a)),
                "rejected": "".join(map(str, b)),
                "subset": "linear",
            }
        )
        diffs.append(d)
    return rows, np.asarray(diffs)


def ceiling(true_diffs: np.ndarray) -> float:
    """Accuracy of the true reward on the set's labels (ties wrong)."""
    return float(np.mean(np.asarray(true_diffs) > 0))


def cyclic_pairs(n: int, *, filler: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` pairs balanced over the three cycle edges (0 > 1, 1 > 2, 2 > 0), each shown with random
    filler digits (so responses are distinct and only the type carries the preference)."""
    rng = np.random.default_rng(seed)
    edges = ((0, 1), (1, 2), (2, 0))
    rows = []
    for i in range(n):
        win, lose = edges[i % 3]
        fa, fb = rng.integers(3, 10, size=(2, filler))
        rows.append(
            {
                "prompt": PROMPT,
                "chosen": str(win) + "".join(map(str, fa)),
                "rejected": str(lose) + "".join(map(str, fb)),
                "subset": f"cycle-{win}>{lose}",
            }
        )
    order = rng.permutation(n)
    return [rows[i] for i in order]


def write_jsonl(rows: Sequence[dict[str, Any]], path: str) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
