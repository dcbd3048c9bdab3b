"""Tree statistics, selection, backup, duplicates and pairs on hand-built trees (numbers by hand)."""

import math

import numpy as np
import pytest

from alignjax.search.mcts import MCTSConfig, Tree, search
from alignjax.search.pairs import extract_pairs, tree_pairs, write_jsonl
from alignjax.search.tree import (
    Node,
    Step,
    add_children,
    backup,
    chosen_path,
    length_normalised_prior,
    puct_score,
    select_child,
)

from .invariants import check_tree


def test_prior_length_normalised():
    # |a| = 4: 4^1.25 = 4 * 4^0.25 = 4 * 1.414214 = 5.656854; -2 / 5.656854 = -0.353553; exp -> 0.702189
    assert length_normalised_prior(-2.0, 4) == pytest.approx(0.702189, abs=1e-6)
    # |a| = 0 is clamped to 1: exp(-0.5) = 0.606531
    assert length_normalised_prior(-0.5, 0) == pytest.approx(0.606531, abs=1e-6)
    # 0.3 + 1 * 0.5 * sqrt(4) / (1 + 1) = 0.3 + 0.5 = 0.8
    assert puct_score(0.3, 0.5, 4, 1, 1.0) == pytest.approx(0.8)


def _hand_tree():
    """root(v=0) -> a(v=.6, p=.5), b(v=.2, p=.3), c(v=.9, p=.2); a -> a1(v=1.7), a2(v=-.5), terminal."""
    root = Node()
    a, b, c = (Node(text=t, parent=root, depth=1, value=v, prior=p)
               for t, v, p in (("a\n", 0.6, 0.5), ("b\n", 0.2, 0.3), ("c\n", 0.9, 0.2)))
    root.children = [a, b, c]
    a1 = Node(text="a1", parent=a, depth=2, value=1.7, terminal=True)  # 0.7 self-eval + 1 outcome
    a2 = Node(text="a2", parent=a, depth=2, value=-0.5, terminal=True)  # 0.5 self-eval - 1 outcome
    a.children = [a1, a2]
    for n in (a1, a2, b, c):  # leaves: Q = r + V, V = 0
        backup([n], visit=False)
    return root, a, b, c, a1, a2


def _backed_up_tree():
    root, a, b, c, a1, a2 = _hand_tree()
    # leaves: Q = r = v - v_parent: a1 1.7-0.6 = 1.1, a2 -0.5-0.6 = -1.1, b 0.2-0 = 0.2, c 0.9
    assert [a1.q, a2.q, b.q, c.q] == pytest.approx([1.1, -1.1, 0.2, 0.9])
    backup([root, a, a1])
    # a1: N=1, Q=1.1. a: N=1, V=(1*1.1 + max(1,0)*(-1.1))/2 = 0, Q = 0.6 + 0 = 0.6
    # root: N=1, V=(0.6 + 0.2 + 0.9)/3 = 0.566667, Q = r + V = 0 + 0.566667
    assert (a1.visits, a.visits, root.visits) == (1, 1, 1)
    assert a.v_children == pytest.approx(0.0, abs=1e-12)
    assert a.q == pytest.approx(0.6)
    assert root.v_children == pytest.approx(1.7 / 3)
    backup([root, a, a1])
    # a: N=2, V=(2*1.1 + 1*(-1.1))/3 = 0.366667, Q = 0.6 + 0.366667 = 0.966667
    # root: V=(2*0.966667 + 1*0.2 + 1*0.9)/(2+1+1) = 3.033333/4 = 0.758333
    assert a.v_children == pytest.approx(1.1 / 3)
    assert a.q == pytest.approx(0.6 + 1.1 / 3)
    assert root.v_children == pytest.approx((2 * (0.6 + 1.1 / 3) + 1.1) / 4)
    return root, a, b, c, a1, a2


def test_backup_hand_computed():
    _backed_up_tree()


def test_puct_selection_hand_computed():
    root, a, b, c, a1, a2 = _backed_up_tree()
    # N_root = 2, sqrt(2) = 1.414214
    # a: 0.966667 + 0.5*1.414214/(1+2) = 1.202369; b: 0.2 + 0.3*1.414214 = 0.624264
    # c: 0.9 + 0.2*1.414214 = 1.182843
    assert select_child(root, c=1.0) is a
    # c = 2: a: 0.966667 + 0.471405 = 1.438072; c: 0.9 + 0.565685 = 1.465685 -> c
    assert select_child(root, c=2.0) is c
    assert puct_score(a.q, a.prior, 2, 2, 2.0) == pytest.approx(1.438072, abs=1e-6)


def test_pairs_along_chosen_path(tmp_path):
    root, a, b, c, a1, a2 = _backed_up_tree()
    tree = Tree(0, (7, 8), "Q: 1+2*3?\n", root)
    assert chosen_path(root) == [root, a, a1]  # most visited: a (2) at depth 1, a1 (2) at depth 2
    pairs = tree_pairs(tree, max_pairs=4)
    # root: highest Q a (0.966667) vs lowest b (0.2); a: a1 (1.1) vs a2 (-1.1)
    assert [(p.chosen, p.rejected) for p in pairs] == [("a\n", "b\n"), ("a1", "a2")]
    assert [(p.chosen_visits, p.rejected_visits) for p in pairs] == [(2, 0), (2, 0)]
    assert pairs[0].prompt == "Q: 1+2*3?\n" and pairs[1].prompt == "Q: 1+2*3?\na\n"
    assert pairs[0].chosen_q == pytest.approx(0.966667, abs=1e-6)
    assert len(tree_pairs(tree, max_pairs=1)) == 1
    # a Q gap of 2.2 at depth 1 is not above 2.5, the 0.766667 at the root neither: no pairs
    assert tree_pairs(tree, max_pairs=4, min_q_gap=2.5) == []
    n = write_jsonl(pairs, tmp_path / "p.jsonl")
    import json
    rows = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert n == 2 and rows[1]["chosen"] == "a1" and rows[1]["chosen_visits"] == 2
    assert {"prompt", "chosen", "rejected", "chosen_visits", "rejected_visits"} <= set(rows[0])


def test_duplicate_merge():
    root = Node()
    steps = [Step((1, 2), -1.0, "x\n"), Step((3,), [-0.25, -0.25], "y\n"), Step((1, 2), -1.0, "x\n")]
    new = add_children(root, steps)
    assert [n.text for n in new] == ["x\n", "y\n"]
    # x twice: 2 * exp(-1 / 2^1.25) = 2 * exp(-0.420448) = 2 * 0.656752 = 1.313505
    assert new[0].prior == pytest.approx(1.313505, abs=1e-6) and new[0].count == 2
    # y: per-token log-probs summed -> -0.5, |a| = 1: exp(-0.5) = 0.606531
    assert new[1].prior == pytest.approx(0.606531, abs=1e-6) and new[1].logp == -0.5
    # a later duplicate merges into the existing child, keeps its visits, returns no new node
    new[1].visits = 3
    assert add_children(root, [Step((3,), -0.5, "y\n")]) == []
    assert len(root.children) == 2 and new[1].visits == 3
    assert new[1].prior == pytest.approx(2 * 0.606531, abs=1e-6)
    # without merging, all three are kept
    assert len(add_children(Node(), steps, merge_duplicates=False)) == 3


class FakeModel:
    """Random steps from a small alphabet (so duplicates happen); records every call."""

    def __init__(self, k, seed=0, p_terminal=0.3):
        self.rng = np.random.default_rng(seed)
        self.k, self.p_terminal = k, p_terminal
        self.expand_calls, self.eval_calls = [], []

    def expand(self, prefixes):
        self.expand_calls.append([p.tree for p in prefixes])
        out = []
        for _ in prefixes:
            n = int(self.rng.integers(1, self.k + 1))
            out.append([Step((int(t),), float(-self.rng.random()), f"s{int(t)}\n",
                             bool(self.rng.random() < self.p_terminal))
                        for t in self.rng.integers(0, 4, size=n)])
        return out

    def evaluate(self, prefixes):
        self.eval_calls.append(len(prefixes))
        return [float(self.rng.random()) for _ in prefixes]

    def outcome(self, prefixes):
        return [1.0 if len(p.text) % 2 else -1.0 for p in prefixes]


@pytest.mark.parametrize("rollout", [True, False])
def test_budget_and_consistency(rollout):
    cfg = MCTSConfig(num_iterations=12, num_children=3, max_depth=4, expand_until_terminal=rollout)
    fake = FakeModel(3, seed=1)
    trees, stats = search([((1,), "p0"), ((2,), "p1")], fake.expand, fake.evaluate, fake.outcome, cfg)
    for tree in trees:
        check_tree(tree, cfg, rollout)
    assert stats.steps == len(fake.expand_calls) == len(fake.eval_calls)
    assert stats.expanded_nodes == sum(t.expansions for t in trees)
    assert stats.new_children == sum(t.num_nodes() - 1 for t in trees)
    pairs = extract_pairs(trees, max_pairs=2)
    for p in pairs:
        assert p.chosen_q > p.rejected_q and p.chosen != p.rejected


def test_batched_across_trees_one_call_per_step():
    # no terminals, one expansion per iteration, deep enough: every step expands one leaf of every tree
    cfg = MCTSConfig(num_iterations=5, num_children=2, max_depth=50, expand_until_terminal=False)
    fake = FakeModel(2, seed=3, p_terminal=0.0)
    trees, stats = search([((i,), f"p{i}") for i in range(3)], fake.expand, fake.evaluate, None, cfg)
    assert fake.expand_calls == [[0, 1, 2]] * 5  # ONE call per iteration with all trees' leaves
    assert stats.steps == 5 and all(t.iterations == 5 for t in trees)
    # rollout mode: each call holds at most one leaf per tree, all active trees, and the calls equal the
    # largest per-tree expansion count
    cfg = MCTSConfig(num_iterations=4, num_children=3, max_depth=3)
    fake = FakeModel(3, seed=5)
    trees, stats = search([((i,), f"p{i}") for i in range(4)], fake.expand, fake.evaluate, fake.outcome, cfg)
    for call in fake.expand_calls:
        assert len(call) == len(set(call))
    assert len(fake.expand_calls) == max(t.expansions for t in trees)
    assert sum(len(c) for c in fake.expand_calls) == sum(t.expansions for t in trees)


def test_too_many_children_is_an_error():
    cfg = MCTSConfig(num_iterations=1, num_children=1)
    with pytest.raises(ValueError, match="num_children=1"):
        two = lambda ps: [[Step((1,), 0.0, "a"), Step((2,), 0.0, "b")]] * len(ps)
        search([((1,), "p")], two, None, None, cfg)
    with pytest.raises(ValueError, match="max_depth"):
        MCTSConfig(max_depth=0)


def test_first_iteration_rollout_hand_computed():
    # One tree, one iteration, rollout: expand root -> {x (v .3), y (v .8)}; N_root = 0 so PUCT = Q -> y;
    # expand y -> {z terminal, self-eval .5, outcome +1 -> v = 1.5}; z terminal ends the iteration.
    def expand(ps):
        return [[Step((1,), -1.0, "x\n"), Step((2,), -1.0, "y\n")] if not p.step_texts else
                [Step((3,), -0.1, "z", True)] for p in ps]

    def evaluate(ps):
        return [{"x\n": 0.3, "y\n": 0.8, "z": 0.5}[p.step_texts[-1]] for p in ps]

    (tree,), stats = search([((0,), "q\n")], expand, evaluate, lambda ps: [1.0] * len(ps),
                            MCTSConfig(num_iterations=1, num_children=2, max_depth=5))
    root = tree.root
    x, y = root.children
    (z,) = y.children
    assert stats.steps == 2
    assert (root.visits, x.visits, y.visits, z.visits) == (1, 0, 1, 1)
    # z: r = 1.5 - 0.8 = 0.7 = Q; y: V = 0.7, Q = 0.8 + 0.7 = 1.5; x: Q = 0.3
    # root: V = (1*1.5 + max(1,0)*0.3)/2 = 0.9
    assert z.q == pytest.approx(0.7) and y.q == pytest.approx(1.5) and x.q == pytest.approx(0.3)
    assert root.v_children == pytest.approx(0.9)
    assert math.isclose(z.value, 1.5)
