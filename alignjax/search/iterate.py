"""The pieces of the iterative MCTS-DPO loop (the ``mcts_dpo`` job, :mod:`alignjax.jobs.mcts_dpo`).

"Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning" (Xie et al., arXiv:2405.00451).
The rounds run over a task of the data layer (:class:`alignjax.data.synthetic.Task`: prompts, SFT
records and a verifier; :func:`alignjax.data.synthetic.reasoning_task`). Here: each round's training
prompts (:func:`round_prompts`); a round's step-level pairs from MCTS (:func:`search_round`: prompt =
problem + shared steps, chosen/rejected = the highest- and lowest-Q child,
``chosen_visits``/``rejected_visits``; as records, :func:`step_records`) or the paper's instance-level
pairs at a per-prompt token budget (:func:`instance_pairs`); held-out greedy accuracy under the task's
verifier (:func:`greedy_accuracy`); the batch size a round with few pairs trains at
(:func:`round_batch_size`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from alignjax.data.synthetic import Task
from alignjax.eval.task_accuracy import completion_text, greedy_correct
from alignjax.search.generate import SelfEvalFormat
from alignjax.search.mcts import MCTSConfig
from alignjax.search.pairs import extract_pairs
from alignjax.search.run import Policy, SearchConfig, search_policy


def round_prompts(task: Task, round_index: int, n: int, seed: int) -> list[str]:
    """Round ``k``'s ``n`` training prompts: slice ``k`` of a seeded permutation (wrapping around)."""
    order = np.random.default_rng([seed, 2]).permutation(len(task.train_prompts))
    idx = [(round_index * n + i) % len(order) for i in range(n)]
    return [task.train_prompts[order[i]] for i in idx]


# ------------------------------------------------------------------------------------------ pieces


def search_config(config: Any) -> SearchConfig:
    """``config.search`` -> :class:`SearchConfig` (self_eval: the default "\\n=" -> "1"/"0" format or off)."""
    s = config.search
    mcts = MCTSConfig(
        num_iterations=int(s.num_iterations),
        num_children=int(s.num_children),
        max_depth=int(s.max_depth),
        c_puct=float(s.c_puct),
        length_penalty=float(s.length_penalty),
    )
    return SearchConfig(
        mcts=mcts,
        max_step_tokens=int(s.max_step_tokens),
        temperature=float(s.temperature),
        top_p=float(s.top_p),
        self_eval=SelfEvalFormat() if s.self_eval else None,
        max_pairs_per_tree=int(s.max_pairs_per_tree),
        min_q_gap=float(s.min_q_gap),
        seed=int(config.seed),
    )


def greedy_accuracy(
    policy: Policy, prompts: Sequence[str], max_new_tokens: int, batch: int = 256
) -> dict[str, Any]:
    """Share of ``prompts`` whose greedy completion (cut at EOS) ``policy.verifier`` accepts."""
    correct = greedy_correct(
        policy.generator, policy.params, policy.tokenizer, prompts, policy.verifier,
        max_new_tokens=max_new_tokens, prompt_ids=policy.prompt_ids, batch_size=batch,
    )  # fmt: skip
    return {"accuracy": float(correct.mean()), "num_prompts": len(prompts), "num_correct": int(correct.sum())}


def instance_pairs(
    policy: Policy,
    prompts: Sequence[str],
    budgets: Sequence[int],
    key: jax.Array,
    *,
    max_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Instance-level pairs at a per-prompt token budget (the MCTS-DPO paper's baseline).

    ``max_samples`` whole solutions are drawn per prompt in one batched call; prompt ``i`` *uses* them in
    order while its generated tokens so far are below ``budgets[i]`` (so it spends the budget, rounded up
    to one sample). The pair is the first correct against the first incorrect used sample; a prompt whose
    used samples are all correct or all wrong gives none. Returns ``(records, stats)``.
    """
    eos = int(policy.tokenizer.eos_id)
    out = policy.generator.generate(
        policy.params,
        [policy.prompt_ids(p) for p in prompts],
        key,
        num_samples=max_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_tokens=(eos,),
    )
    records, used_tokens, used_samples, exhausted = [], 0, 0, 0
    for i, p in enumerate(prompts):
        spent, good, bad = 0, None, None
        for j in range(max_samples):
            if spent >= budgets[i]:
                break
            ids, _ = out.row(i, j)
            spent += len(ids)
            used_samples += 1
            text = completion_text(policy.tokenizer, ids)
            if policy.verifier(p, text):
                good = text if good is None else good
            else:
                bad = text if bad is None else bad
        else:
            exhausted += int(spent < budgets[i])
        used_tokens += spent
        if good is not None and bad is not None and good.strip() and bad.strip():
            records.append({"prompt": p, "chosen": good, "rejected": bad})
    stats = {
        "generated_tokens": used_tokens,
        "samples": used_samples,
        "budget_tokens": int(sum(budgets)),
        "prompts_budget_not_reached": exhausted,
    }
    return records, stats


# ------------------------------------------------------------------------------------------ a round's pairs


def step_records(pairs: Sequence[Any], tokenizer: Any) -> list[dict[str, Any]]:
    """``StepPair.to_record()`` rows with ``append_eos=False``: a step is a partial solution, so only a
    terminal step (one that ended with EOS) carries the EOS, written as its text (``"answer 16<eos>"``);
    an EOS after an intermediate step would train the policy to stop there."""
    eos, eos_text = int(tokenizer.eos_id), tokenizer.special["eos_token"]
    out = []
    for p in pairs:
        rec = dict(p.to_record(), append_eos=False)
        for side in ("chosen", "rejected"):
            ids = getattr(p, f"{side}_ids")
            if ids and ids[-1] == eos:
                rec[side] += eos_text
        out.append(rec)
    return out


def search_round(
    policy: Policy, prompts: Sequence[str], scfg: SearchConfig, key: jax.Array
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """MCTS on ``prompts`` -> step-pair records (:func:`step_records`) and the search statistics."""
    trees, sstats, counters = search_policy(policy, prompts, scfg, key)
    pairs = extract_pairs(trees, scfg.max_pairs_per_tree, scfg.min_q_gap)
    # A whitespace-only step (a bare delimiter) is not a valid preference completion: such pairs are dropped
    # (and counted) rather than rejected by the data loader.
    kept = [p for p in pairs if p.chosen.strip() and p.rejected.strip()]
    per_prompt = [sum(len(n.tokens) * n.count for n in t.root.iter_nodes() if n is not t.root) for t in trees]
    stats = {
        "generated_tokens": int(counters["generated_tokens"]),
        "tokens_per_prompt": per_prompt,
        "expanded_nodes": sstats.expanded_nodes,
        "new_children": sstats.new_children,
        "expand_calls": counters["expand_calls"],
        "pairs_dropped_blank": len(pairs) - len(kept),
        "solved_trees": sum(any(n.outcome == 1.0 for n in t.root.iter_nodes()) for t in trees),
    }
    return step_records(kept, policy.tokenizer), stats


def round_batch_size(batch_size: int, num_pairs: int, devices: int) -> int:
    """``batch_size``, or when a round found fewer pairs, the largest multiple of ``devices`` <= them
    (the data pipeline needs one full batch; the batch is split over the devices)."""
    if num_pairs >= batch_size:
        return batch_size
    return num_pairs // devices * devices
