"""End-to-end: MCTS and SPaR refinement with the tiny random model on the multi-step arithmetic task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.models import PRESETS, Model
from alignjax.search.generate import Generator
from alignjax.search.mcts import MCTSConfig, beam_search
from alignjax.search.pairs import extract_pairs
from alignjax.search.run import Policy, SearchConfig, run_search, search_policy
from alignjax.search.spar import SPaRConfig, refinement_pairs, refinement_trees, spar_pairs
from alignjax.search.tree import Node, Step

from .invariants import check_tree

syn = pytest.importorskip("alignjax.data.synthetic")


@pytest.fixture(scope="module")
def policy():
    tok = syn.multistep_tokenizer()
    model = Model(PRESETS["tiny"].replace(vocab_size=tok.vocab_size))
    params = model.init(jax.random.PRNGKey(0))
    gen = Generator(model, pad_id=tok.pad_id, min_prompt_bucket=32, min_batch_bucket=8)
    return Policy(model, params, tok, syn.multistep_verify, lambda s: syn.final_answer(s) is not None,
                  generator=gen)


PROMPTS = ["12+30+7=", "5+61+20="]
CFG = SearchConfig(MCTSConfig(num_iterations=3, num_children=3, max_depth=2), max_step_tokens=8)


def test_mcts_end_to_end(policy):
    trees, stats, counters = search_policy(policy, PROMPTS, CFG)
    generated = 0
    for tree in trees:
        check_tree(tree, CFG.mcts, rollout=True)
        assert tree.prompt_text == PROMPTS[tree.index]
        for node in tree.root.iter_nodes():
            if node is tree.root:
                continue
            generated += len(node.tokens) * node.count
            assert 0.0 <= node.self_eval <= 1.0
            # prior = exp(l / |a|^1.25) (merged duplicates add theirs)
            assert node.prior == pytest.approx(node.count * np.exp(node.logp / len(node.tokens) ** 1.25))
            if node.terminal:
                completion = "".join(n.text for n in node.steps())
                expect = 1.0 if syn.multistep_verify(tree.prompt_text, completion) else -1.0
                assert node.outcome == expect
    assert counters["expand_calls"] == stats.steps and counters["generated_tokens"] == generated
    # a node's log-prob equals the sum of token log-probs from one full forward pass
    child = trees[0].root.children[0]
    ids = list(trees[0].prompt_tokens) + list(child.tokens)
    logits = policy.model.apply(policy.params, jnp.asarray([ids]))[0].astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, -1)[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])]
    assert float(lp[len(trees[0].prompt_tokens) - 1:].sum()) == pytest.approx(child.logp, abs=1e-4)
    pairs = extract_pairs(trees, CFG.max_pairs_per_tree)
    assert pairs, "a 3-way expansion of random samples gives at least one Q gap"
    for p in pairs:
        assert p.prompt.startswith(PROMPTS[p.tree]) and p.chosen_q > p.rejected_q
        assert 0 <= p.rejected_visits and p.chosen_visits <= CFG.mcts.num_iterations
    # run_search is the same search, deterministic for a fixed seed
    again = run_search(policy, PROMPTS, CFG)
    assert [p.to_record() for p in again] == [p.to_record() for p in pairs]


def test_beam_search_budget_fake():
    calls = []

    def expand(ps):
        calls.append([(p.tree, len(p.step_texts)) for p in ps])
        return [[Step((i,), -1.0, f"{p.text}|{i}") for i in range(3)] for p in ps]

    def evaluate(ps):  # value grows with the last digit; tree 1 reaches 0.9 at level 2 -> stops
        return [0.2 * int(p.step_texts[-1][-1]) + (0.25 * len(p.step_texts) if p.tree == 1 else 0)
                for p in ps]

    trees, stats = beam_search([((1,), "a"), ((2,), "b")], expand, evaluate, None, breadth=3, keep=2, depth=3,
                               stop_value=0.9)
    # level 1: both roots; level 2: keep=2 best children of each tree (values .4, .2 -> digits 2, 1)
    assert calls[0] == [(0, 0), (1, 0)]
    assert calls[1] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    # tree 1 at level 2: 0.2*2 + 0.5 = 0.9 >= stop -> only tree 0 continues
    assert calls[2] == [(0, 2), (0, 2)] and stats.steps == 3
    # the fake's text = prefix text (prompt "a" + step "a|2") + "|0"
    assert [n.text for n in trees[0].root.children[2].children[:1]] == ["aa|2|0"]
    assert max(n.depth for n in trees[0].root.iter_nodes()) == 3
    assert max(n.depth for n in trees[1].root.iter_nodes()) == 2


def test_refinement_pairs_hand_built():
    root = Node(text="bad", value=0.3)
    a = Node(text="fix1", parent=root, depth=1, value=0.45)
    b = Node(text="fix2", parent=a, depth=2, value=0.8)
    c = Node(text="fix3", parent=root, depth=1, value=0.8)  # ties b; found later in pre-order -> b kept
    root.children, a.children = [a, c], [b]
    from alignjax.search.mcts import Tree

    pairs = refinement_pairs([Tree(0, (), "q=", root)], threshold=0.5)
    assert pairs == [{"prompt": "q=", "chosen": "fix2", "rejected": "bad", "chosen_score": 0.8,
                      "rejected_score": 0.3, "refine_depth": 2, "tree": 0}]
    b.value = c.value = 0.4  # nothing judged correct -> no pair
    assert refinement_pairs([Tree(0, (), "q=", root)], threshold=0.5) == []


def test_spar_with_policy(policy):
    cfg = SPaRConfig(max_response_tokens=12, threshold=0.5)
    responses = ["12+30=42\n42+7=50\nanswer 50", "5+61=66\n66+20=86\nanswer 86"]
    trees, stats = refinement_trees(policy, PROMPTS, responses, cfg)
    for tree in trees:
        assert tree.root.text == responses[tree.index]
        by_depth = {}
        for node in tree.root.iter_nodes():
            by_depth.setdefault(node.depth, []).append(node)
            assert len(node.children) <= cfg.breadth and node.depth <= cfg.depth
        for d in range(1, cfg.depth):  # at most `keep` nodes of a level are expanded
            assert sum(1 for n in by_depth.get(d, []) if n.children) <= cfg.keep
        assert tree.root.visits == sum(1 for n in tree.root.iter_nodes() if n.children)  # one per expansion
    pairs = refinement_pairs(trees, cfg.threshold)
    for p in pairs:
        assert p["chosen_score"] >= cfg.threshold > 0 and p["rejected"] == responses[p["tree"]]
    full = spar_pairs(policy, PROMPTS, responses, cfg)
    judged = policy.generator.self_evaluate(
        policy.params, [policy.prompt_ids(f"{p}{r}\n=") for p, r in zip(PROMPTS, responses)],
        policy.single_token("1", "yes"), policy.single_token("0", "no"))
    assert {p["tree"] for p in full} <= {i for i, s in enumerate(judged) if s < cfg.threshold}
