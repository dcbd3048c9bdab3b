"""The policy-backed search: model callbacks for :func:`alignjax.search.mcts.search` and ``run_search``.

``run_search(policy, prompts, config) -> list[StepPair]`` is the entry the iterative MCTS-DPO loop calls
each round (search with the current policy, then train on the pairs; "Monte Carlo Tree Search Boosts
Reasoning via Iterative Preference Learning", arXiv:2405.00451).

The callbacks:

* ``expand_fn``: one :meth:`Generator.generate` call for all leaves, ``num_children`` samples each, stopping
  at the step delimiter (``"\\n"``) or EOS, at most ``max_step_tokens`` tokens; a step is terminal when it
  ended with EOS or ``policy.is_final_step(step_text)`` (e.g. an ``answer N`` line);
* ``evaluate_fn``: self-evaluation ``P(correct)`` (see :class:`SelfEvalFormat`) in one forward pass;
* ``outcome_fn``: ``+1`` if ``policy.verifier(prompt_text, completion_text)`` else ``-1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from alignjax.search.generate import Generator, SelfEvalFormat
from alignjax.search.mcts import MCTSConfig, Prefix, SearchStats, Tree, search
from alignjax.search.pairs import StepPair, extract_pairs
from alignjax.search.tree import Step


@dataclasses.dataclass
class Policy:
    """A model with its params, tokenizer and task hooks.

    ``tokenizer``: anything with ``encode(text) -> ids``, ``decode(ids) -> text`` and ``eos_id``
    (e.g. :class:`alignjax.data.tokenize.ChatTokenizer`). ``verifier(prompt_text, completion_text) -> bool``
    checks a finished solution; ``is_final_step(step_text) -> bool`` marks an answer step as terminal.
    ``encode_prompt`` (default ``tokenizer.encode``) turns a problem into prompt ids (chat templates go here).
    """

    model: Any
    params: Any
    tokenizer: Any
    verifier: Callable[[str, str], bool]
    is_final_step: Callable[[str], bool] | None = None
    step_delimiter: str = "\n"
    encode_prompt: Callable[[str], Sequence[int]] | None = None
    generator: Generator | None = None

    def __post_init__(self):
        if self.generator is None:
            pad = getattr(self.tokenizer, "pad_id", 0)
            self.generator = Generator(self.model, pad_id=0 if pad is None else int(pad))

    def prompt_ids(self, text: str) -> list[int]:
        fn = self.encode_prompt or self.tokenizer.encode
        return [int(t) for t in fn(text)]

    def single_token(self, text: str, what: str) -> int:
        ids = self.tokenizer.encode(text)
        if len(ids) < 1:
            raise ValueError(f"{what}={text!r} encodes to no token")
        return int(ids[0])


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Search budget (``mcts``), sampling, self-evaluation format and pair extraction settings."""

    mcts: MCTSConfig = MCTSConfig()
    max_step_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    self_eval: SelfEvalFormat | None = SelfEvalFormat()
    max_pairs_per_tree: int = 4
    min_q_gap: float = 0.0
    seed: int = 0


@dataclasses.dataclass
class SearchFns:
    """The three callbacks plus counters (model calls, generated tokens)."""

    expand: Callable[[list[Prefix]], list[list[Step]]]
    evaluate: Callable[[list[Prefix]], Sequence[float]] | None
    outcome: Callable[[list[Prefix]], Sequence[float]]
    counters: dict[str, int]


def make_search_fns(policy: Policy, config: SearchConfig, key: jax.Array | None = None) -> SearchFns:
    """Builds the model-backed ``expand_fn``/``evaluate_fn``/``outcome_fn`` (see the module docstring)."""
    key = jax.random.PRNGKey(config.seed) if key is None else key
    tok = policy.tokenizer
    eos = int(tok.eos_id)
    delim = policy.single_token(policy.step_delimiter, "step_delimiter")
    counters = {"expand_calls": 0, "generated_tokens": 0, "evaluate_calls": 0, "evaluated": 0}

    def expand(prefixes: list[Prefix]) -> list[list[Step]]:
        out = policy.generator.generate(
            policy.params, [p.tokens for p in prefixes], jax.random.fold_in(key, counters["expand_calls"]),
            num_samples=config.mcts.num_children, max_new_tokens=config.max_step_tokens,
            temperature=config.temperature, top_p=config.top_p, stop_tokens=(delim, eos))
        counters["expand_calls"] += 1
        counters["generated_tokens"] += int(out.lengths.sum())
        result = []
        for i in range(len(prefixes)):
            steps = []
            for j in range(config.mcts.num_children):
                ids, logps = out.row(i, j)
                text = tok.decode(ids)
                terminal = ids[-1] == eos or bool(policy.is_final_step and policy.is_final_step(text))
                steps.append(Step(tuple(ids), [float(x) for x in logps], text, terminal))
            result.append(steps)
        return result

    evaluate = None
    if config.self_eval is not None:
        fmt = config.self_eval
        suffix = [int(t) for t in tok.encode(fmt.suffix)]
        yes = policy.single_token(fmt.yes, "SelfEvalFormat.yes")
        no = policy.single_token(fmt.no, "SelfEvalFormat.no") if fmt.no is not None else None
        if no == yes:
            raise ValueError(f"SelfEvalFormat: yes={fmt.yes!r} and no={fmt.no!r} start with the same token")

        def evaluate(prefixes: list[Prefix]) -> np.ndarray:
            counters["evaluate_calls"] += 1
            counters["evaluated"] += len(prefixes)
            return policy.generator.self_evaluate(policy.params, [list(p.tokens) + suffix for p in prefixes],
                                                  yes, no)

    def outcome(prefixes: list[Prefix]) -> list[float]:
        return [1.0 if policy.verifier(p.prompt_text, "".join(p.step_texts)) else -1.0 for p in prefixes]

    return SearchFns(expand, evaluate, outcome, counters)


def search_policy(policy: Policy, prompts: Sequence[str], config: SearchConfig,
                  key: jax.Array | None = None) -> tuple[list[Tree], SearchStats, dict[str, int]]:
    """MCTS with the policy on every prompt (batched across prompts); returns trees, stats, counters."""
    fns = make_search_fns(policy, config, key)
    trees, stats = search([(policy.prompt_ids(p), p) for p in prompts], fns.expand, fns.evaluate,
                          fns.outcome, config.mcts)
    return trees, stats, fns.counters


def run_search(policy: Policy, prompts: Sequence[str], config: SearchConfig,
               key: jax.Array | None = None) -> list[StepPair]:
    """Searches every prompt and returns the step-level pairs (``StepPair.to_record()`` gives the rows)."""
    trees, _, _ = search_policy(policy, prompts, config, key)
    return extract_pairs(trees, config.max_pairs_per_tree, config.min_q_gap)
