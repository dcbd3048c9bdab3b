"""Batched MCTS over reasoning steps, many trees at once (MCTS-DPO, arXiv:2405.00451).

One search *iteration* of a tree follows the paper and its official code: select a leaf by PUCT from the
root; then, until a terminal node or the depth limit, expand the leaf (sample ``num_children`` next steps),
evaluate the new children, refresh ``V``/``Q`` along the path and step into the PUCT-best new child; at
the end, back up with one visit for every node on the path. (``expand_until_terminal=False`` gives the
textbook variant: one expansion per iteration.)

The loop advances all trees in lock-step: at each *step* it gathers the leaves to expand across all trees
and makes ONE ``expand_fn`` call and ONE ``evaluate_fn`` call (and one ``outcome_fn`` call for the new
terminal children), so generation batches across trees. A tree stops after ``num_iterations``
iterations; the loop stops when every tree has.

Budget guarantees: at most ``num_children`` children per node (``expand_fn`` returning more is an error),
no node deeper than ``max_depth`` steps, exactly ``num_iterations`` iterations per tree, i.e.
``root.visits == num_iterations``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

from alignjax.search.tree import Node, Step, add_children, backup, refresh, select_child


class Prefix(NamedTuple):
    """A partial solution handed to the model callbacks.

    ``tree``: index of the tree (problem) in the batch; ``prompt_tokens``/``prompt_text``: the problem;
    ``step_tokens``/``step_texts``: the steps so far (root first). ``tokens``/``text`` concatenate them.
    """

    tree: int
    prompt_tokens: tuple[int, ...]
    prompt_text: str
    step_tokens: tuple[tuple[int, ...], ...]
    step_texts: tuple[str, ...]

    @property
    def tokens(self) -> tuple[int, ...]:
        out = tuple(self.prompt_tokens)
        for s in self.step_tokens:
            out += tuple(s)
        return out

    @property
    def text(self) -> str:
        return self.prompt_text + "".join(self.step_texts)


ExpandFn = Callable[[list[Prefix]], list[list[Step]]]
EvaluateFn = Callable[[list[Prefix]], Sequence[float]]
OutcomeFn = Callable[[list[Prefix]], Sequence[float]]


@dataclasses.dataclass(frozen=True)
class MCTSConfig:
    """Search budget and constants (defaults from MCTS-DPO, arXiv:2405.00451: c = 1, lambda = 1.25)."""

    num_iterations: int = 8
    num_children: int = 3
    max_depth: int = 6
    c_puct: float = 1.0
    length_penalty: float = 1.25
    gamma: float = 1.0
    expand_until_terminal: bool = True
    merge_duplicates: bool = True

    def __post_init__(self):
        for key in ("num_iterations", "num_children", "max_depth"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"MCTSConfig.{key} must be >= 1, got {getattr(self, key)!r}")


@dataclasses.dataclass(eq=False)
class Tree:
    """One problem's search tree plus its loop state."""

    index: int
    prompt_tokens: tuple[int, ...]
    prompt_text: str
    root: Node
    iterations: int = 0
    expansions: int = 0
    path: list[Node] | None = None  # the iteration in progress

    def prefix(self, node: Node) -> Prefix:
        steps = node.steps()
        return Prefix(self.index, self.prompt_tokens, self.prompt_text,
                      tuple(n.tokens for n in steps), tuple(n.text for n in steps))

    def num_nodes(self) -> int:
        return sum(1 for _ in self.root.iter_nodes())


@dataclasses.dataclass
class SearchStats:
    """Counters of one :func:`search` call."""

    steps: int = 0  # lock-step rounds = expand_fn calls
    expanded_nodes: int = 0
    new_children: int = 0


def _is_leaf_stop(node: Node, max_depth: int) -> bool:
    """A node where an iteration ends without expanding: terminal, at the depth limit, or a dead end."""
    return node.terminal or node.depth >= max_depth or (node.expanded and not node.children)


def _descend(root: Node, c: float, max_depth: int) -> list[Node]:
    path = [root]
    while path[-1].children and not _is_leaf_stop(path[-1], max_depth):
        path.append(select_child(path[-1], c))
    return path


def search(
    prompts: Sequence[tuple[Sequence[int], str]],
    expand_fn: ExpandFn,
    evaluate_fn: EvaluateFn | None,
    outcome_fn: OutcomeFn | None,
    config: MCTSConfig,
    roots: Sequence[Node] | None = None,
) -> tuple[list[Tree], SearchStats]:
    """Runs ``config.num_iterations`` MCTS iterations on one tree per prompt, batched across trees.

    ``prompts``: ``(prompt_tokens, prompt_text)`` per problem. ``expand_fn(prefixes)`` returns, for each
    prefix, up to ``num_children`` :class:`Step` s (or ``(tokens, logp)`` tuples). ``evaluate_fn(prefixes)``
    returns the self-evaluation ``P(correct)`` of each new child (None: 0). ``outcome_fn(prefixes)`` returns
    the verifier outcome (+1 / -1) of each new TERMINAL child; ``v = P(correct) + outcome``.
    ``roots``: continue searching existing trees (one root per prompt) instead of fresh ones.
    """
    trees = [
        Tree(i, tuple(int(t) for t in toks), text, roots[i] if roots is not None else Node())
        for i, (toks, text) in enumerate(prompts)
    ]
    if roots is not None and len(roots) != len(prompts):
        raise ValueError(f"search: {len(roots)} roots for {len(prompts)} prompts")
    stats = SearchStats()
    cfg = config

    def finish(tree: Tree) -> None:
        backup(tree.path, cfg.gamma, visit=True)
        tree.iterations += 1
        tree.path = None

    while True:
        to_expand: list[Tree] = []
        for tree in trees:
            # Start iterations until one needs an expansion (iterations that end at a terminal or at the
            # depth limit cost no model call and finish at once).
            while tree.iterations < cfg.num_iterations:
                if tree.path is None:
                    tree.path = _descend(tree.root, cfg.c_puct, cfg.max_depth)
                if _is_leaf_stop(tree.path[-1], cfg.max_depth):
                    finish(tree)
                    continue
                to_expand.append(tree)
                break
        if not to_expand:
            break
        stats.steps += 1
        leaves = [t.path[-1] for t in to_expand]
        all_steps = expand_fn([t.prefix(leaf) for t, leaf in zip(to_expand, leaves)])
        if len(all_steps) != len(leaves):
            raise ValueError(f"expand_fn returned {len(all_steps)} lists for {len(leaves)} prefixes")
        new_nodes: list[tuple[Tree, Node]] = []
        for tree, leaf, steps in zip(to_expand, leaves, all_steps):
            if len(steps) > cfg.num_children:
                raise ValueError(f"expand_fn returned {len(steps)} steps for one prefix, more than "
                                 f"MCTSConfig.num_children={cfg.num_children}")
            kids = add_children(leaf, steps, cfg.length_penalty, cfg.merge_duplicates)
            tree.expansions += 1
            stats.expanded_nodes += 1
            new_nodes.extend((tree, k) for k in kids)
        stats.new_children += len(new_nodes)
        _evaluate(new_nodes, evaluate_fn, outcome_fn)
        for tree, leaf in zip(to_expand, leaves):
            for child in leaf.children:
                refresh(child, cfg.gamma)
            backup(tree.path, cfg.gamma, visit=False)  # fresh V/Q along the path for the next selection
            if cfg.expand_until_terminal and leaf.children:
                tree.path.append(select_child(leaf, cfg.c_puct))
                if not _is_leaf_stop(tree.path[-1], cfg.max_depth):
                    continue  # expand the chosen child at the next step
            finish(tree)
    return trees, stats


def _evaluate(new_nodes: list[tuple[Tree, Node]], evaluate_fn: EvaluateFn | None,
              outcome_fn: OutcomeFn | None) -> None:
    """``v = P(correct)`` for every new node, ``+ outcome`` for the terminal ones (one call each)."""
    if not new_nodes:
        return
    prefixes = [t.prefix(n) for t, n in new_nodes]
    if evaluate_fn is not None:
        values = list(evaluate_fn(prefixes))
        if len(values) != len(prefixes):
            raise ValueError(f"evaluate_fn returned {len(values)} values for {len(prefixes)} prefixes")
        for (_, node), v in zip(new_nodes, values):
            node.self_eval = float(v)
    terminal = [(p, n) for p, (_, n) in zip(prefixes, new_nodes) if n.terminal]
    if terminal and outcome_fn is not None:
        outcomes = list(outcome_fn([p for p, _ in terminal]))
        if len(outcomes) != len(terminal):
            raise ValueError(f"outcome_fn returned {len(outcomes)} values for {len(terminal)} prefixes")
        for (_, node), o in zip(terminal, outcomes):
            node.outcome = float(o)
    for _, node in new_nodes:
        node.value = node.self_eval + (node.outcome or 0.0)


def beam_search(
    prompts: Sequence[tuple[Sequence[int], str]],
    expand_fn: ExpandFn,
    evaluate_fn: EvaluateFn | None,
    outcome_fn: OutcomeFn | None,
    *,
    breadth: int,
    keep: int,
    depth: int,
    stop_value: float | None = None,
    roots: Sequence[Node] | None = None,
    length_penalty: float = 1.25,
    gamma: float = 1.0,
    merge_duplicates: bool = True,
) -> tuple[list[Tree], SearchStats]:
    """Level-by-level tree search on the same trees, callbacks and statistics as :func:`search`.

    At each level every active tree's frontier (at most ``keep`` nodes) is expanded into up to ``breadth``
    children each, ALL trees' frontiers in ONE ``expand_fn`` call and all new children in ONE
    ``evaluate_fn`` call; the next frontier is the ``keep`` new children of highest value (ties: earliest).
    A tree stops after ``depth`` levels, or as soon as a new child reaches ``stop_value`` (a success).
    Visits and ``Q``/``V`` are backed up for every expanded frontier node (so the trees read like MCTS
    trees). This is SPaR's refinement search ("SPaR: Self-Play with Tree-Search Refinement to Improve
    Instruction-Following in Large Language Models", arXiv:2412.11605: breadth 3, keep 2, depth 3).
    """
    if min(breadth, keep, depth) < 1:
        raise ValueError(f"beam_search: breadth, keep and depth must be >= 1, got {breadth}, {keep}, {depth}")
    if roots is not None and len(roots) != len(prompts):
        raise ValueError(f"beam_search: {len(roots)} roots for {len(prompts)} prompts")
    trees = [
        Tree(i, tuple(int(t) for t in toks), text, roots[i] if roots is not None else Node())
        for i, (toks, text) in enumerate(prompts)
    ]
    frontier = {t.index: [t.root] for t in trees}
    stats = SearchStats()
    for _ in range(depth):
        jobs = [(t, n) for t in trees for n in frontier[t.index] if not n.terminal]
        if not jobs:
            break
        stats.steps += 1
        all_steps = expand_fn([t.prefix(n) for t, n in jobs])
        if len(all_steps) != len(jobs):
            raise ValueError(f"expand_fn returned {len(all_steps)} lists for {len(jobs)} prefixes")
        new_nodes: list[tuple[Tree, Node]] = []
        for (tree, node), steps in zip(jobs, all_steps):
            if len(steps) > breadth:
                raise ValueError(f"expand_fn returned {len(steps)} steps for one prefix, "
                                 f"more than breadth={breadth}")
            kids = add_children(node, steps, length_penalty, merge_duplicates)
            tree.expansions += 1
            stats.expanded_nodes += 1
            new_nodes.extend((tree, k) for k in kids)
        stats.new_children += len(new_nodes)
        _evaluate(new_nodes, evaluate_fn, outcome_fn)
        for _, node in jobs:
            for child in node.children:
                refresh(child, gamma)
            backup(node.path(), gamma, visit=True)
        for tree in trees:
            kids = [n for t, n in new_nodes if t is tree]
            done = stop_value is not None and any(k.value >= stop_value for k in kids)
            ranked = sorted(range(len(kids)), key=lambda i: (-kids[i].value, i))
            frontier[tree.index] = [] if done else [kids[i] for i in ranked[:keep]]
    return trees, stats
