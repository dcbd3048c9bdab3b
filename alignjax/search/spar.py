"""SPaR-style refinement pairs: the policy judges its own responses and refines the rejected ones.

"SPaR: Self-Play with Tree-Search Refinement to Improve Instruction-Following in Large Language Models"
(Cheng et al., arXiv:2412.11605). For each (prompt, response) the policy, acting as judge, gives
``P(correct)``; a response judged incorrect (``< threshold``) becomes the root of a refinement tree searched
with :func:`alignjax.search.mcts.beam_search` (the same trees and callbacks as MCTS): a node is a whole
response, its children are ``breadth`` refinements of it sampled by the policy, the judge scores them, the
``keep`` best continue, for at most ``depth`` levels, stopping at the first refinement judged correct.
Pair: the best refinement judged correct (chosen) > the original (rejected), same prompt; trained with
DPO + 0.1 NLL (objectives.md).

Prompt formats are function/config arguments: ``judge_template`` is formatted with ``prompt`` and
``response`` and followed by the :class:`SelfEvalFormat` yes/no token; ``refine_template`` likewise gives the
prompt from which a refinement is sampled (until EOS). The defaults suit the char-level synthetic tasks
(the alphabets have no letters for instructions): judge ``"{prompt}{response}\\n="`` then ``1``/``0``; refine
``"{prompt}{response}\\n{prompt}"`` (the model sees its attempt, then answers again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from alignjax.search.generate import SelfEvalFormat
from alignjax.search.mcts import Prefix, SearchStats, Tree, beam_search
from alignjax.search.run import Policy
from alignjax.search.tree import Node, Step


@dataclasses.dataclass(frozen=True)
class SPaRConfig:
    """Refinement search settings (SPaR defaults: breadth 3, keep 2, depth 3)."""

    breadth: int = 3
    keep: int = 2
    depth: int = 3
    threshold: float = 0.5
    max_response_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    judge_template: str = "{prompt}{response}\n="
    refine_template: str = "{prompt}{response}\n{prompt}"
    judge_format: SelfEvalFormat = SelfEvalFormat(suffix="")
    seed: int = 0


def current_response(prefix: Prefix, originals: Sequence[str]) -> str:
    """The response a refinement-tree node holds: its last refinement, else the tree's original."""
    return prefix.step_texts[-1] if prefix.step_texts else originals[prefix.tree]


def make_judge(policy: Policy, config: SPaRConfig):
    """``judge(prompts, responses) -> P(correct)`` from the policy's yes/no next-token probabilities."""
    fmt = config.judge_format
    yes = policy.single_token(fmt.yes, "SPaRConfig.judge_format.yes")
    no = policy.single_token(fmt.no, "SPaRConfig.judge_format.no") if fmt.no is not None else None

    def judge(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        texts = [config.judge_template.format(prompt=p, response=r) + fmt.suffix
                 for p, r in zip(prompts, responses)]
        return policy.generator.self_evaluate(policy.params, [policy.prompt_ids(t) for t in texts], yes, no)

    return judge


def refinement_trees(policy: Policy, prompts: Sequence[str], responses: Sequence[str], config: SPaRConfig,
                     key: jax.Array | None = None) -> tuple[list[Tree], SearchStats]:
    """Refinement search rooted at each (prompt, response); root values are the judge's scores."""
    key = jax.random.PRNGKey(config.seed) if key is None else key
    judge = make_judge(policy, config)
    eos = int(policy.tokenizer.eos_id)
    calls = [0]

    def expand(prefixes: list[Prefix]) -> list[list[Step]]:
        texts = [config.refine_template.format(prompt=p.prompt_text, response=current_response(p, responses))
                 for p in prefixes]
        out = policy.generator.generate(
            policy.params, [policy.prompt_ids(t) for t in texts], jax.random.fold_in(key, calls[0]),
            num_samples=config.breadth, max_new_tokens=config.max_response_tokens,
            temperature=config.temperature, top_p=config.top_p, stop_tokens=(eos,))
        calls[0] += 1
        steps = []
        for i in range(len(prefixes)):
            row = []
            for j in range(config.breadth):
                ids, logps = out.row(i, j)
                row.append(Step(tuple(ids), [float(x) for x in logps], policy.tokenizer.decode(ids)))
            steps.append(row)
        return steps

    def evaluate(prefixes: list[Prefix]) -> np.ndarray:
        return judge([p.prompt_text for p in prefixes], [current_response(p, responses) for p in prefixes])

    root_values = judge(prompts, responses)
    roots = [Node(text=r, value=float(v), self_eval=float(v)) for r, v in zip(responses, root_values)]
    return beam_search([(policy.prompt_ids(p), p) for p in prompts], expand, evaluate, None,
                       breadth=config.breadth, keep=config.keep, depth=config.depth,
                       stop_value=config.threshold, roots=roots)


def refinement_pairs(trees: Sequence[Tree], threshold: float = 0.5) -> list[dict]:
    """Per tree: the highest-judged refinement (earliest on ties) > the original, when the refinement is
    judged correct (``>= threshold``) and better than the original."""
    out = []
    for tree in trees:
        best = None
        for node in tree.root.iter_nodes():
            if node is not tree.root and (best is None or node.value > best.value):
                best = node
        if best is None or best.value < threshold or best.value <= tree.root.value:
            continue
        out.append({"prompt": tree.prompt_text, "chosen": best.text, "rejected": tree.root.text,
                    "chosen_score": float(best.value), "rejected_score": float(tree.root.value),
                    "refine_depth": int(best.depth), "tree": int(tree.index)})
    return out


def spar_pairs(policy: Policy, prompts: Sequence[str], responses: Sequence[str] | None = None,
               config: SPaRConfig = SPaRConfig(), key: jax.Array | None = None) -> list[dict]:
    """Judge ``responses`` (default: one sampled per prompt), refine those judged incorrect, return the
    refined > original pairs (``prompt``/``chosen``/``rejected`` records; ``tree`` indexes ``prompts``)."""
    key = jax.random.PRNGKey(config.seed) if key is None else key
    if responses is None:
        out = policy.generator.generate(
            policy.params, [policy.prompt_ids(p) for p in prompts], jax.random.fold_in(key, 10**6),
            max_new_tokens=config.max_response_tokens, temperature=config.temperature, top_p=config.top_p,
            stop_tokens=(int(policy.tokenizer.eos_id),))
        responses = [policy.tokenizer.decode(out.row(i, 0)[0]) for i in range(len(prompts))]
    scores = make_judge(policy, config)(prompts, responses)
    neg = [i for i, s in enumerate(scores) if s < config.threshold]
    if not neg:
        return []
    trees, _ = refinement_trees(policy, [prompts[i] for i in neg], [responses[i] for i in neg], config, key)
    pairs = refinement_pairs(trees, config.threshold)
    for p in pairs:
        p["tree"] = neg[p["tree"]]
    return pairs
