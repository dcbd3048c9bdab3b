"""Step-level preference pairs from search trees (MCTS-DPO, arXiv:2405.00451).

Along the chosen path (the most visited child at each depth, from the root), every node with at least
two children gives one pair: the highest-``Q`` child (chosen) against the lowest-``Q`` child (rejected),
with the prompt = the problem followed by the steps of the shared prefix. Pairs whose ``Q`` gap is not
larger than ``min_q_gap`` are skipped (no preference). At most ``max_pairs`` pairs per tree, the
shallowest first (the earliest decisions carry the most downstream consequence and the most visits).

Records are the standard preference rows (``prompt``, ``chosen``, ``rejected``) plus
``chosen_visits``/``rejected_visits`` (for the step-level cDPO confidence
``eps = min(N_l / (max(1, N_w) + N_l), 0.5)``), the ``Q`` values and depth; ``with_token_ids`` adds
``prompt_ids``/``chosen_ids``/``rejected_ids``. The policy log-probs of chosen and rejected are meant
to be taken over the step tokens (from the first token where they differ, as the paper does; a shared
leading piece of two steps contributes equally to both and cancels in DPO's margin).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

from alignjax.search.mcts import Tree
from alignjax.search.tree import Node, chosen_path


@dataclasses.dataclass(frozen=True)
class StepPair:
    """One step-level preference pair; ``to_record`` gives the JSON row."""

    prompt: str
    chosen: str
    rejected: str
    chosen_visits: int
    rejected_visits: int
    chosen_q: float
    rejected_q: float
    depth: int
    tree: int
    prompt_ids: tuple[int, ...] = ()
    chosen_ids: tuple[int, ...] = ()
    rejected_ids: tuple[int, ...] = ()

    def to_record(self, with_token_ids: bool = False) -> dict:
        rec = {
            "prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
            "chosen_visits": int(self.chosen_visits), "rejected_visits": int(self.rejected_visits),
            "chosen_q": float(self.chosen_q), "rejected_q": float(self.rejected_q),
            "depth": int(self.depth), "tree": int(self.tree),
        }
        if with_token_ids:
            rec.update(prompt_ids=list(self.prompt_ids), chosen_ids=list(self.chosen_ids),
                       rejected_ids=list(self.rejected_ids))
        return rec


def extreme_children(node: Node) -> tuple[Node, Node]:
    """(highest-Q child, lowest-Q child); ties go to the earliest child for both."""
    best = worst = node.children[0]
    for child in node.children[1:]:
        if child.q > best.q:
            best = child
        if child.q < worst.q:
            worst = child
    return best, worst


def tree_pairs(tree: Tree, max_pairs: int = 4, min_q_gap: float = 0.0) -> list[StepPair]:
    """Pairs along ``tree``'s chosen path (see the module docstring)."""
    pairs: list[StepPair] = []
    for node in chosen_path(tree.root):
        if len(pairs) >= max_pairs:
            break
        if len(node.children) < 2:
            continue
        best, worst = extreme_children(node)
        if best.q - worst.q <= min_q_gap:
            continue
        prefix = tree.prefix(node)
        pairs.append(StepPair(
            prompt=prefix.text, chosen=best.text, rejected=worst.text,
            chosen_visits=best.visits, rejected_visits=worst.visits,
            chosen_q=best.q, rejected_q=worst.q, depth=node.depth, tree=tree.index,
            prompt_ids=prefix.tokens, chosen_ids=best.tokens, rejected_ids=worst.tokens,
        ))
    return pairs


def extract_pairs(trees: Sequence[Tree], max_pairs: int = 4, min_q_gap: float = 0.0) -> list[StepPair]:
    """:func:`tree_pairs` over all trees, in tree order."""
    return [p for t in trees for p in tree_pairs(t, max_pairs, min_q_gap)]


def write_jsonl(pairs: Iterable[StepPair | dict], path: str | os.PathLike,
                with_token_ids: bool = False) -> int:
    """Writes one JSON record per line (atomically: a temp file renamed); returns the number written."""
    tmp = f"{os.fspath(path)}.tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pairs:
            rec = p.to_record(with_token_ids) if isinstance(p, StepPair) else p
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
