"""alignjax.search: KV-cache generation, MCTS over reasoning steps (MCTS-DPO), step-level pairs, SPaR.

Public: ``run_search(policy, prompts, config) -> list[StepPair]`` (the iterative MCTS-DPO entry),
``Policy``, ``SearchConfig``, ``MCTSConfig``, ``search`` / ``beam_search`` (model-free, callback-driven),
``Generator`` (bucketed jitted sampling + self-evaluation), ``extract_pairs`` / ``write_jsonl``,
``spar_pairs`` / ``SPaRConfig``.
"""

from alignjax.search.generate import Generation, Generator, SelfEvalFormat
from alignjax.search.mcts import MCTSConfig, Prefix, SearchStats, Tree, beam_search, search
from alignjax.search.pairs import StepPair, extract_pairs, tree_pairs, write_jsonl
from alignjax.search.run import Policy, SearchConfig, make_search_fns, run_search, search_policy
from alignjax.search.spar import SPaRConfig, refinement_pairs, refinement_trees, spar_pairs
from alignjax.search.tree import Node, Step, chosen_path

__all__ = [
    "Generation", "Generator", "MCTSConfig", "Node", "Policy", "Prefix", "SPaRConfig", "SearchConfig",
    "SearchStats", "SelfEvalFormat", "Step", "StepPair", "Tree", "beam_search", "chosen_path",
    "extract_pairs", "make_search_fns", "refinement_pairs", "refinement_trees", "run_search", "search",
    "search_policy", "spar_pairs", "tree_pairs", "write_jsonl",
]
