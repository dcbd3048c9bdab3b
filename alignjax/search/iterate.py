"""The iterative MCTS-DPO loop: SFT, then rounds of search -> step-level pairs -> DPO -> held-out eval.

"Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning" (Xie et al., arXiv:2405.00451).
``run_mcts_dpo(config, workdir)`` (``config.job = "mcts_dpo"``, see ``experiments/mcts_dpo.py``; its
summary, of :func:`mcts_dpo_rounds`, which also returns the trained params, model and generator):

1. **SFT** (``<sft_dir>``, default ``<workdir>/sft``): :func:`alignjax.train.loop.run_train` on the task's
   SFT records (the built-in multi-step arithmetic with a carry-dropping habit, or a GSM8K-style JSONL),
   or ``config.mcts_dpo.init`` = an HF directory / preset used as the SFT model as it is. The SFT params
   are the frozen reference of every round.
2. **Round k** (``<workdir>/round_k``) with the current policy:

   * ``method="mcts"``: :func:`alignjax.search.run.search_policy` on ``prompts_per_round`` training prompts
     -> step-level pairs (``pairs.jsonl``: prompt = problem + shared steps, chosen/rejected = the highest-
     and lowest-Q child, ``chosen_visits``/``rejected_visits``) -> ``run_train`` with the ``mcts_dpo``
     loss (cDPO with ``eps = min(N_l / (max(1, N_w) + N_l), 0.5)``) and ``data.kind = "step"``;
   * ``method="instance"`` (the paper's instance-level baseline at the same sample budget): whole
     solutions are sampled per prompt until they have used as many generated tokens as the search spent on
     that prompt (``budget_from`` = an MCTS run's workdir, or ``budget_tokens`` per prompt), verified, and
     one correct vs one incorrect solution per prompt is a pair; ``run_train`` with ``instance_loss``
     (DPO, ``sigmoid``);

   then greedy decoding on the held-out prompts checked by the verifier (``eval.json``).

Resumable: a round whose ``done.json`` exists is skipped (its params are restored from the last checkpoint
of ``round_k/train``, without search or training); inside a round, ``pairs.jsonl`` is written atomically
and not regenerated, and ``run_train`` resumes from its own checkpoints in ``round_k/train``.
``<workdir>/summary.json`` holds the held-out accuracy of SFT and after every round, pairs and budgets.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from alignjax import sharding, storage
from alignjax.data import synthetic
from alignjax.data.pipeline import resolve_tokenizer
from alignjax.search.generate import Generator, SelfEvalFormat
from alignjax.search.mcts import MCTSConfig
from alignjax.search.pairs import extract_pairs, write_jsonl
from alignjax.search.run import Policy, SearchConfig, search_policy
from alignjax.train.checkpoint import fingerprint
from alignjax.train.loop import build_model, run_train
from alignjax.train.pipeline import stage_config as base_stage

METHODS = ("mcts", "instance")

# ------------------------------------------------------------------------------------------ the task


@dataclasses.dataclass
class Task:
    """Prompts, SFT records and the verifier of one reasoning task.

    ``verify(prompt, completion) -> bool``; ``is_final_step(step_text) -> bool`` marks the answer step.
    """

    train_prompts: list[str]
    test_prompts: list[str]
    sft_records: list[dict[str, Any]]
    verify: Callable[[str, str], bool]
    is_final_step: Callable[[str], bool]


def carry(x: int, y: int) -> bool:
    """True when adding the units digits of ``x`` and ``y`` carries."""
    return x % 10 + y % 10 >= 10


def habit_solution(a: int, b: int, c: int, rng: np.random.Generator, drop_rate: float) -> str:
    """A multi-step solution whose addition steps each drop the units carry with prob. ``drop_rate``.

    ``"a+b=x\\nx+c=y\\nanswer y"``; a dropped carry writes ``x = a + b - 10`` (and likewise for ``y``), and
    the later steps continue consistently from the wrong value: a habit the SFT model learns.
    """
    x = a + b - (10 if carry(a, b) and rng.random() < drop_rate else 0)
    y = x + c - (10 if carry(x, c) and rng.random() < drop_rate else 0)
    return f"{a}+{b}={x}\n{x}+{c}={y}\nanswer {y}"


def multistep_problem_splits(
    max_operand: int, n_test: int, seed: int
) -> dict[str, list[tuple[int, int, int]]]:
    """Disjoint ``train``/``test`` triples with operands in ``0..max_operand`` (99: the built-in
    :func:`alignjax.data.synthetic.multistep_splits` with 2,000 training problems)."""
    if max_operand >= 99:
        s = synthetic.multistep_splits(seed, n_val=0, n_test=n_test)
        return {"train": s["train"], "test": s["test"]}
    m = max_operand + 1
    if n_test >= m**3:
        raise ValueError(f"config.mcts_dpo.num_test={n_test} leaves no training problem among {m**3}")
    order = np.random.default_rng(seed).permutation(m**3)
    problems = [(int(v // (m * m)), int(v // m % m), int(v % m)) for v in order]
    return {"test": problems[:n_test], "train": problems[n_test:]}


def multistep_task(max_operand: int, n_test: int, drop_rate: float, seed: int) -> Task:
    """The built-in multi-step arithmetic task with a carry-dropping SFT habit (:func:`habit_solution`)."""
    splits = multistep_problem_splits(max_operand, n_test, seed)
    rng = np.random.default_rng([seed, 1])
    sft = [
        {"prompt": synthetic.multistep_prompt(*p), "completion": habit_solution(*p, rng, drop_rate)}
        for p in splits["train"]
    ]
    return Task(
        train_prompts=[synthetic.multistep_prompt(*p) for p in splits["train"]],
        test_prompts=[synthetic.multistep_prompt(*p) for p in splits["test"]],
        sft_records=sft,
        verify=synthetic.multistep_verify,
        is_final_step=lambda s: synthetic.final_answer(s) is not None,
    )


def gsm8k_task(path: str, test_path: str, n_test: int) -> Task:
    """A GSM8K-style JSONL (``question``/``answer`` with ``#### N``): the verifier compares the final number.

    ``test_path`` = a second JSONL of held-out problems; "" = the last ``n_test`` rows of ``path``.
    """
    rows = synthetic.read_gsm8k(path)
    test = synthetic.read_gsm8k(test_path) if test_path else rows[-n_test:]
    train = rows if test_path else rows[:-n_test]
    if not train or not test:
        raise ValueError(
            f"{path}: {len(rows)} rows leave {len(train)} for training and {len(test)} for "
            f"testing (config.mcts_dpo.num_test={n_test}); give more rows or test_source"
        )
    finals = {r["prompt"]: r["final"] for r in train + test}

    def verify(prompt: str, completion: str) -> bool:
        return synthetic.gsm8k_verify(completion, finals[prompt])

    return Task(
        train_prompts=[r["prompt"] for r in train],
        test_prompts=[r["prompt"] for r in test],
        sft_records=[{"prompt": r["prompt"], "completion": r["completion"]} for r in train],
        verify=verify,
        is_final_step=lambda s: "####" in s,
    )


def make_task(config: Any) -> Task:
    """``config.data.source``: ``"synthetic:multistep"`` (built-in) or a GSM8K-style JSONL path."""
    m = config.mcts_dpo
    source = config.data.source
    if source.startswith("synthetic:"):
        if not source.startswith("synthetic:multistep"):
            raise ValueError(
                f"config.data.source={source!r}: the MCTS-DPO loop runs on synthetic:multistep "
                "or a GSM8K-style JSONL path"
            )
        return multistep_task(int(m.max_operand), int(m.num_test), float(m.drop_rate), int(m.split_seed))
    if not os.path.exists(source):
        raise FileNotFoundError(f"config.data.source={source!r}: no such file (a GSM8K-style JSONL)")
    return gsm8k_task(source, m.test_source, int(m.num_test))


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


def completion_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decoded tokens, cut at the first EOS."""
    ids = list(ids)
    eos = int(tokenizer.eos_id)
    return tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)


def greedy_accuracy(
    policy: Policy, prompts: Sequence[str], max_new_tokens: int, batch: int = 256
) -> dict[str, Any]:
    """Share of ``prompts`` whose greedy completion (cut at EOS) ``policy.verifier`` accepts."""
    eos = int(policy.tokenizer.eos_id)
    correct = []
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i : i + batch])
        out = policy.generator.generate(
            policy.params,
            [policy.prompt_ids(p) for p in chunk],
            jax.random.PRNGKey(0),
            max_new_tokens=max_new_tokens,
            greedy=True,
            stop_tokens=(eos,),
        )
        for j, p in enumerate(chunk):
            ids, _ = out.row(j, 0)
            correct.append(bool(policy.verifier(p, completion_text(policy.tokenizer, ids))))
    return {
        "accuracy": float(np.mean(correct)),
        "num_prompts": len(prompts),
        "num_correct": int(sum(correct)),
    }


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


def stage_config(config: Any, stage: str, **data: Any) -> Any:
    """The train config of ``stage`` (``config.<stage>`` overrides), with ``data`` keys replaced."""
    c = base_stage(config, stage)
    with c.unlocked():
        for key in ("mcts_dpo", "search"):
            if key in c:
                del c[key]
        for key, value in data.items():
            c.data[key] = value
    return c


def _write_json(path: str, obj: Any) -> None:
    if jax.process_index() == 0:
        storage.write_json(path, obj)


def _write_records(records: Sequence[dict[str, Any]], path: str) -> None:
    if jax.process_index() == 0:
        write_jsonl(records, path)


# ------------------------------------------------------------------------------------------ the loop


@dataclasses.dataclass(frozen=True)
class MctsDpoResult:
    """What :func:`mcts_dpo_rounds` returns: ``summary`` (``summary.json``, what the ``mcts_dpo`` job
    prints), the final policy params, the SFT params (every round's reference), the model and the
    generator the rounds decoded with."""

    summary: dict[str, Any]
    params: Any
    sft_params: Any
    model: Any
    generator: Generator


def run_mcts_dpo(config: Any, workdir: str) -> dict[str, Any]:
    """The ``mcts_dpo`` job: :func:`mcts_dpo_rounds`'s summary."""
    return mcts_dpo_rounds(config, workdir).summary


def mcts_dpo_rounds(config: Any, workdir: str) -> MctsDpoResult:
    """Runs (or resumes) the whole iterative loop in ``workdir``; writes ``summary.json``."""
    t0 = time.time()
    m = config.mcts_dpo
    if m.method not in METHODS:
        raise ValueError(f"config.mcts_dpo.method={m.method!r}; choose one of {list(METHODS)}")
    os.makedirs(workdir, exist_ok=True)

    task = make_task(config)
    tokenizer = resolve_tokenizer(config.data.tokenizer)

    # ---- SFT (or a given initial model): the policy's start and the frozen reference of every round
    sft_dir = m.sft_dir or os.path.join(workdir, "sft")
    t_sft = time.time()
    if m.init:
        init_cfg = stage_config(config, "sft")
        with init_cfg.unlocked():
            init_cfg.model.path = m.init

        mesh, rules = sharding.make_mesh(dict(config.mesh)), sharding.rules_from_config(config.rules or None)
        model, sft_params = build_model(init_cfg.model, mesh, rules, tokenizer.vocab_size)
        if sft_params is None:  # a preset: randomly initialised with config.seed
            init = jax.jit(model.init, out_shardings=model.shardings(mesh, rules))
            sft_params = init(jax.random.PRNGKey(config.seed))
    else:
        os.makedirs(sft_dir, exist_ok=True)
        sft_data = os.path.join(sft_dir, "sft_data.jsonl")
        if not os.path.exists(sft_data):
            _write_records(task.sft_records, sft_data)
        sft = run_train(stage_config(config, "sft", kind="sft", source=sft_data, eval_source=""), sft_dir)
        model, sft_params = sft.model, sft.params
    t_sft = time.time() - t_sft
    generator = Generator(model, pad_id=int(tokenizer.pad_id or 0), min_prompt_bucket=16, min_batch_bucket=8)

    def policy_for(params: Any) -> Policy:
        return Policy(
            model,
            params,
            tokenizer,
            task.verify,
            task.is_final_step,
            step_delimiter=m.step_delimiter,
            generator=generator,
        )

    test_prompts = task.test_prompts[: int(m.num_test)]
    sft_eval_path = os.path.join(sft_dir if not m.init else workdir, "eval.json")
    if os.path.exists(sft_eval_path):
        sft_eval = storage.read_json(sft_eval_path)
    else:
        sft_eval = greedy_accuracy(policy_for(sft_params), test_prompts, int(m.eval_max_new_tokens))
        _write_json(sft_eval_path, sft_eval)

    scfg = search_config(config)
    params = sft_params
    rounds: list[dict[str, Any]] = []
    for k in range(int(m.rounds)):
        rdir = os.path.join(workdir, f"round_{k}")
        os.makedirs(rdir, exist_ok=True)
        done_path = os.path.join(rdir, "done.json")
        if os.path.exists(done_path):
            info = storage.read_json(done_path)
            if info["trained"]:  # restore the round's final params (no search, no training step)
                params = _train_round(config, rdir, info["data_path"], model, params, sft_params)
            rounds.append(info)
            continue
        t_round = time.time()
        prompts = round_prompts(task, k, int(m.prompts_per_round), int(m.split_seed))
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), k)
        pairs_path = os.path.join(rdir, "pairs.jsonl")
        stats_path = os.path.join(rdir, "search.json")
        if not (os.path.exists(pairs_path) and os.path.exists(stats_path)):
            if m.method == "mcts":
                records, stats = _search_round(policy_for(params), prompts, scfg, key)
            else:
                budgets = _instance_budgets(config, k, prompts)
                records, stats = instance_pairs(
                    policy_for(params),
                    prompts,
                    budgets,
                    key,
                    max_samples=int(m.max_samples),
                    max_new_tokens=int(m.eval_max_new_tokens),
                    temperature=float(config.search.temperature),
                    top_p=float(config.search.top_p),
                )
            _write_records(records, pairs_path)
            _write_json(stats_path, stats)
        stats = storage.read_json(stats_path)
        with open(pairs_path) as f:
            num_pairs = sum(1 for line in f if line.strip())
        t_search = time.time() - t_round
        trainable = round_batch_size(int(config.data.batch_size), num_pairs, jax.device_count()) > 0
        if trainable:
            params = _train_round(config, rdir, pairs_path, model, params, sft_params)
        ev = greedy_accuracy(policy_for(params), test_prompts, int(m.eval_max_new_tokens))
        info = {
            "round": k,
            "num_pairs": num_pairs,
            "trained": trainable,
            "data_path": pairs_path,
            "search": stats,
            "eval": ev,
            "fingerprint": fingerprint(params),
            "wall_s/search": t_search,
            "wall_s/round": time.time() - t_round,
        }
        _write_json(done_path, info)
        rounds.append(info)
        print(
            f"[{m.method}] round {k}: {num_pairs} pairs, held-out accuracy {ev['accuracy']:.3f} "
            f"({info['wall_s/round']:.0f} s)",
            flush=True,
        )

    summary = {
        "method": m.method,
        "task_accuracy/sft": sft_eval["accuracy"],
        "task_accuracy/final": rounds[-1]["eval"]["accuracy"] if rounds else sft_eval["accuracy"],
        "task_accuracy/rounds": [r["eval"]["accuracy"] for r in rounds],
        "num_pairs/rounds": [r["num_pairs"] for r in rounds],
        "generated_tokens/rounds": [r["search"]["generated_tokens"] for r in rounds],
        "num_test_prompts": len(test_prompts),
        "wall_s/sft": t_sft,
        "wall_s/total": time.time() - t0,
    }
    _write_json(os.path.join(workdir, "summary.json"), summary)
    return MctsDpoResult(summary, params, sft_params, model, generator)


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


def _search_round(
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


def _instance_budgets(config: Any, k: int, prompts: Sequence[str]) -> list[int]:
    """Per-prompt token budgets: from the MCTS run in ``budget_from`` (same round) or ``budget_tokens``."""
    m = config.mcts_dpo
    if m.budget_from:
        path = os.path.join(m.budget_from, f"round_{k}", "search.json")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"config.mcts_dpo.budget_from={m.budget_from!r}: {path} is missing "
                "(run the MCTS method first, with the same prompts_per_round)"
            )
        per_prompt = storage.read_json(path)["tokens_per_prompt"]
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{path}: {len(per_prompt)} prompts searched, this round has {len(prompts)}")
        return [int(b) for b in per_prompt]
    if int(m.budget_tokens) <= 0:
        raise ValueError(
            "method='instance' needs config.mcts_dpo.budget_from (an MCTS workdir) or "
            "config.mcts_dpo.budget_tokens > 0 (generated tokens per prompt)"
        )
    return [int(m.budget_tokens)] * len(prompts)


def round_batch_size(batch_size: int, num_pairs: int, devices: int) -> int:
    """``batch_size``, or when a round found fewer pairs, the largest multiple of ``devices`` <= them
    (the data pipeline needs one full batch; the batch is split over the devices)."""
    if num_pairs >= batch_size:
        return batch_size
    return num_pairs // devices * devices


def _train_round(config: Any, rdir: str, data_path: str, model: Any, params: Any, sft_params: Any) -> Any:
    """DPO on the round's pairs from ``params`` against the frozen SFT reference; returns the new params."""
    m = config.mcts_dpo
    kind, loss = ("step", m.step_loss) if m.method == "mcts" else ("pairwise", m.instance_loss)
    cfg = stage_config(config, "dpo", kind=kind, source=data_path, eval_source="")
    with open(data_path) as f:
        num_pairs = sum(1 for line in f if line.strip())
    with cfg.unlocked():
        cfg.data.batch_size = round_batch_size(int(cfg.data.batch_size), num_pairs, jax.device_count())
    with cfg.unlocked():
        cfg.loss.name = loss
        cfg.reference.kind = "frozen"
    out = run_train(
        cfg, os.path.join(rdir, "train"), init_params=params, ref_params=sft_params, model=model
    )
    return out.params
