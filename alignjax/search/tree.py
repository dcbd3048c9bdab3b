"""Search-tree nodes and the MCTS-DPO node statistics (pure Python, no model).

Follows "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning"
(Xie et al., arXiv:2405.00451) and its official code (YuxiXie/MCTS-DPO):

* a node is a partial solution: the prompt followed by the steps on the path from the root;
  the edge into a node is one sampled reasoning step ``a`` with its summed token log-prob ``l(a)``;
* prior ``p(a) = exp(l(a) / |a|^lambda)``, ``lambda = 1.25`` (the length penalty), NOT normalised over
  siblings: the paper and the official code use the raw length-normalised probability, so a node's
  exploration bonus does not depend on how many siblings were sampled;
* value ``v`` = the policy's self-evaluation ``P(correct)`` plus the verifier outcome (+1 / -1) at
  terminal nodes; the root's value is 0 (as in the official code; it cancels in sibling comparisons);
* reward ``r = v - v_parent``; ``Q = r + gamma V``; ``V`` = visit-weighted mean of the children's
  ``Q`` with weights ``max(1, N_child)`` (the official code's weights: a freshly expanded, unvisited
  child has been evaluated and counts once); a leaf has ``V = 0``, so with gamma = 1 the values
  telescope: ``Q(child) = E[v at the leaves below child] - v(parent)``;
* selection is PUCT: ``argmax_a Q(a) + c p(a) sqrt(N_parent) / (1 + N(a))``, ``c = 1``.

Deviation from the official code, documented: there a new child's ``Q`` is initialised to
``V_parent + r``; here it is ``r + gamma V_child = r`` (``V = 0`` at a leaf), which keeps ``Q = r + gamma V``
true at every node at all times (the official code reaches the same formula after the child's first backup).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Step(NamedTuple):
    """One sampled reasoning step: what ``expand_fn`` returns per child.

    ``tokens``: the step's token ids (including its delimiter, e.g. "\\n" or EOS);
    ``logp``: the summed log-prob of ``tokens`` under the policy, or the per-token log-probs (summed here);
    ``text``: the decoded step (used to merge duplicates and to write pairs; defaults to the token tuple);
    ``terminal``: True when the step ends the solution (EOS generated, or the final-answer step).
    """

    tokens: tuple[int, ...]
    logp: float | Sequence[float]
    text: str | None = None
    terminal: bool = False


def length_normalised_prior(logp: float, length: int, length_penalty: float = 1.25) -> float:
    """``p(a) = exp(l(a) / |a|^lambda)``, ``|a|`` clamped to >= 1 (MCTS-DPO, arXiv:2405.00451)."""
    return math.exp(float(logp) / max(1, int(length)) ** length_penalty)


def puct_score(q: float, prior: float, parent_visits: int, visits: int, c: float = 1.0) -> float:
    """``Q + c p sqrt(N_parent) / (1 + N)`` (PUCT, as in MCTS-DPO arXiv:2405.00451, c = 1)."""
    return q + c * prior * math.sqrt(parent_visits) / (1 + visits)


@dataclasses.dataclass(eq=False)
class Node:
    """A partial solution. ``tokens``/``text``/``logp`` describe the step on the edge into this node.

    ``value`` is ``v`` (self-evaluation + terminal outcome), ``visits`` is ``N``, ``q``/``v_children`` are
    ``Q`` and ``V``; ``count`` is how many sampled steps were merged into this node (duplicates).
    """

    tokens: tuple[int, ...] = ()
    text: str = ""
    logp: float = 0.0
    prior: float = 1.0
    parent: Node | None = None
    depth: int = 0
    value: float = 0.0
    self_eval: float = 0.0
    outcome: float | None = None
    terminal: bool = False
    expanded: bool = False
    visits: int = 0
    q: float = 0.0
    v_children: float = 0.0
    count: int = 1
    children: list[Node] = dataclasses.field(default_factory=list)

    @property
    def reward(self) -> float:
        """``r = v - v_parent`` (the root's ``r`` is its own value)."""
        return self.value - (self.parent.value if self.parent is not None else 0.0)

    def path(self) -> list[Node]:
        """Nodes from the root to this node, inclusive."""
        nodes, node = [], self
        while node is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def steps(self) -> list[Node]:
        """The step nodes from the root (excluded) to this node (included)."""
        return self.path()[1:]

    def iter_nodes(self):
        """Depth-first iteration over this subtree (pre-order)."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))


def children_value(node: Node) -> float:
    """``V = sum_c max(1, N_c) Q_c / sum_c max(1, N_c)``; 0 for a node without children."""
    if not node.children:
        return 0.0
    weights = [max(1, c.visits) for c in node.children]
    return sum(w * c.q for w, c in zip(weights, node.children)) / sum(weights)


def refresh(node: Node, gamma: float = 1.0) -> None:
    """Recompute ``V`` from the children and ``Q = r + gamma V`` for ``node``."""
    node.v_children = children_value(node)
    node.q = node.reward + gamma * node.v_children


def backup(path: Sequence[Node], gamma: float = 1.0, visit: bool = True) -> None:
    """Bottom-up update along ``path`` (root first): optionally ``N += 1``, then ``V`` and ``Q``.

    The visit is counted before the parent's ``V`` is recomputed, so the weights see the new count (as in
    the official code's ``_back_propagate``).
    """
    for node in reversed(path):
        if visit:
            node.visits += 1
        refresh(node, gamma)


def select_child(node: Node, c: float = 1.0) -> Node:
    """PUCT choice among ``node.children``; ties go to the earliest child (deterministic)."""
    if not node.children:
        raise ValueError("select_child: node has no children")
    best, best_score = None, -math.inf
    for child in node.children:
        score = puct_score(child.q, child.prior, node.visits, child.visits, c)
        if score > best_score:
            best, best_score = child, score
    return best


def add_children(node: Node, steps: Sequence[Step], length_penalty: float = 1.25,
                 merge_duplicates: bool = True) -> list[Node]:
    """Attach sampled ``steps`` as children of ``node``; returns the NEW child nodes (to be evaluated).

    Duplicates (same step text; the token tuple when there is no text) are merged into one child, both
    within ``steps`` and against existing children: the merged child's prior is the SUM of the duplicates'
    priors (sampling the same step k times is evidence of k times its probability mass, so it earns that
    much more exploration), ``count`` adds up, and visits/Q stay those of the existing child (a duplicate
    brings no visits: it was never expanded). Its ``logp``/``tokens`` stay those of the first sample.
    """
    by_key = {c.text: c for c in node.children} if merge_duplicates else {}
    new: list[Node] = []
    for step in steps:
        step = Step(*step) if not isinstance(step, Step) else step
        tokens = tuple(int(t) for t in step.tokens)
        logp = float(np.sum(np.asarray(step.logp, np.float64)))  # a scalar or per-token log-probs
        text = step.text if step.text is not None else repr(tokens)
        prior = length_normalised_prior(logp, len(tokens), length_penalty)
        if merge_duplicates and text in by_key:
            twin = by_key[text]
            twin.prior += prior
            twin.count += 1
            continue
        child = Node(tokens=tokens, text=text, logp=logp, prior=prior, parent=node, depth=node.depth + 1,
                     terminal=bool(step.terminal))
        node.children.append(child)
        by_key[text] = child
        new.append(child)
    node.expanded = True
    return new


def most_visited_child(node: Node) -> Node:
    """The child with most visits; ties by higher ``Q``, then the earliest."""
    best = node.children[0]
    for child in node.children[1:]:
        if (child.visits, child.q) > (best.visits, best.q):
            best = child
    return best


def chosen_path(root: Node) -> list[Node]:
    """Root to leaf, taking the most visited child at each depth (MCTS-DPO's chosen trajectory)."""
    path = [root]
    while path[-1].children:
        path.append(most_visited_child(path[-1]))
    return path
