"""Invariants every searched tree satisfies (shared by the fake-model and the real-model tests)."""

import pytest


def check_tree(tree, cfg, rollout):
    root = tree.root
    assert root.visits == cfg.num_iterations
    for node in root.iter_nodes():
        assert node.depth <= cfg.max_depth
        assert len(node.children) <= cfg.num_children
        assert len({c.text for c in node.children}) == len(node.children)  # merged duplicates
        if node.children:
            extra = 0 if rollout else 1  # the iteration that expanded a node ends there without rollout
            if node is root or node.visits > 0:
                assert node.visits == sum(c.visits for c in node.children) + extra
            weights = [max(1, c.visits) for c in node.children]
            v = sum(w * c.q for w, c in zip(weights, node.children)) / sum(weights)
            assert node.v_children == pytest.approx(v)
        else:
            assert node.v_children == 0.0
        assert node.q == pytest.approx(node.reward + node.v_children)
        # telescoping: Q(node) = E[v of leaves below] - v(parent), v in [-1, 2]
        if node.parent is not None:
            lo = min(n.value for n in node.iter_nodes()) - node.parent.value
            hi = max(n.value for n in node.iter_nodes()) - node.parent.value
            assert lo - 1e-9 <= node.q <= hi + 1e-9
        if node.terminal:
            assert not node.children and node.outcome in (1.0, -1.0)
            assert node.value == pytest.approx(node.self_eval + node.outcome)
