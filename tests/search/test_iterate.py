"""The iterative MCTS-DPO loop end to end on a tiny model: one round of search -> pairs -> mcts_dpo -> eval.

Asserts that ``round_0/pairs.jsonl`` is exactly what an independent search with the same policy and key
extracts; that the train step consumed those pairs (each example's policy and reference log-probs at step 1
equal a full forward of the SFT model on one pair of the file, with that pair's visit counts, and the
loss's label smoothing equals ``min(N_l / (max(1, N_w) + N_l), 0.5)`` computed in NumPy); and that a
restart skips the finished round (no search, no train step, the same params fingerprint).
"""

import dataclasses
import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.data import synthetic
from alignjax.eval.task_accuracy import completion_text
from alignjax.jobs import mcts_dpo as mcts_dpo_job
from alignjax.losses import registry
from alignjax.losses.step_level import mcts_dpo, visit_label_smoothing
from alignjax.search import iterate
from alignjax.search.pairs import extract_pairs
from alignjax.search.run import search_policy
from alignjax.train.checkpoint import fingerprint
from experiments import mcts_dpo as experiment

RECORDED: list[list[np.ndarray]] = []


def spy_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_visits,
    rejected_visits,
    *,
    beta=0.1,
):
    """mcts_dpo that also hands its inputs and eps to the host (one record per micro-batch)."""
    eps = visit_label_smoothing(chosen_visits, rejected_visits)
    jax.debug.callback(
        lambda *a: RECORDED.append([np.asarray(x) for x in a]),
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_visits,
        rejected_visits,
        eps,
    )
    return mcts_dpo(
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_visits,
        rejected_visits,
        beta=beta,
    )


def tiny_config():
    c = experiment.get_config("runlocal")
    c.model.overrides.update(
        dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, intermediate_size=64)
    )
    c.data.batch_size = 8
    c.data.max_length = 32
    c.sft.train = dict(num_steps=2)
    c.dpo.train = dict(num_steps=2)
    c.train.async_checkpoints = False
    c.mcts_dpo.prompts_per_round = 6
    c.mcts_dpo.num_test = 8
    c.mcts_dpo.eval_max_new_tokens = 16
    c.search.update(dict(num_iterations=2, num_children=3, max_depth=3, max_step_tokens=8))
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mcts_dpo"))
    config = tiny_config()
    spec = registry.spec("mcts_dpo")
    with mock.patch.dict(registry._REGISTRY, {"mcts_dpo": dataclasses.replace(spec, fn=spy_loss)}):
        RECORDED.clear()
        first = mcts_dpo_job.mcts_dpo_rounds(config, workdir)
        recorded = list(RECORDED)
        RECORDED.clear()
        pairs_path = os.path.join(workdir, "round_0", "pairs.jsonl")
        mtime = os.path.getmtime(pairs_path)
        with mock.patch.object(iterate, "search_policy", side_effect=AssertionError("searched again")):
            second = mcts_dpo_job.mcts_dpo_rounds(config, workdir)
        rerun_recorded = list(RECORDED)
    return dict(
        config=config,
        workdir=workdir,
        first=first,
        second=second,
        recorded=recorded,
        rerun_recorded=rerun_recorded,
        mtime=mtime,
        pairs_path=pairs_path,
    )


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_pairs_file_is_the_search_output(run):
    config, first = run["config"], run["first"]
    task = mcts_dpo_job.make_task(config)
    prompts = iterate.round_prompts(task, 0, config.mcts_dpo.prompts_per_round, config.mcts_dpo.split_seed)
    from alignjax.data.pipeline import resolve_tokenizer

    tok = resolve_tokenizer(config.data.tokenizer)
    policy = iterate.Policy(
        first.model,
        first.sft_params,
        tok,
        task.verify,
        task.is_final_step,
        generator=first.generator,
    )
    scfg = iterate.search_config(config)
    trees, _, counters = search_policy(policy, prompts, scfg, jax.random.fold_in(jax.random.PRNGKey(0), 0))
    pairs = [
        p for p in extract_pairs(trees, scfg.max_pairs_per_tree) if p.chosen.strip() and p.rejected.strip()
    ]
    expected = []
    for p in pairs:
        rec = dict(p.to_record(), append_eos=False)  # steps are partial solutions
        for side in ("chosen", "rejected"):  # terminal steps carry the EOS text
            if getattr(p, f"{side}_ids")[-1] == tok.eos_id:
                rec[side] += "<eos>"
        expected.append(rec)
    rows = read_jsonl(run["pairs_path"])
    assert rows == expected and len(rows) >= 2
    stats = json.load(open(os.path.join(run["workdir"], "round_0", "search.json")))
    assert stats["generated_tokens"] == counters["generated_tokens"] == sum(stats["tokens_per_prompt"])


def completion_logps(model, params, tok, rows, side):
    """Summed completion log-probs of ``rows[i][side]`` by one full forward of the padded batch (the step
    tokenizer: EOS = the step delimiter; right padding cannot change earlier positions)."""
    seqs = []
    for r in rows:
        p_ids = tok.encode_prompt(r["prompt"])
        seqs.append((p_ids, tok.encode_completion(r["prompt"], r[side], p_ids, append_eos=r["append_eos"])))
    width = max(len(p) + len(c) for p, c in seqs)
    ids = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width - 1), np.float32)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = p + c
        mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1.0
    logits = jax.jit(model.apply)(params, jnp.asarray(ids)).astype(jnp.float32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1], -1), jnp.asarray(ids)[:, 1:, None], -1)[
        ..., 0
    ]
    return np.asarray((lp * mask).sum(-1))


def test_training_consumed_the_pairs_with_visit_smoothing(run):
    first, config = run["first"], run["config"]
    rows = read_jsonl(run["pairs_path"])
    recorded = run["recorded"]
    assert len(recorded) == config.dpo.train["num_steps"]  # one micro-batch per step
    step_tok = synthetic.multistep_tokenizer()
    eos_text = step_tok.special["eos_token"]
    for r in rows:  # steps are partial solutions: only a terminal step ends with EOS
        assert r["append_eos"] is False
        for side in ("chosen", "rejected"):
            p_ids = step_tok.encode_prompt(r["prompt"])
            ids = step_tok.encode_completion(r["prompt"], r[side], p_ids, append_eos=False)
            assert (ids[-1] == step_tok.eos_id) == r[side].endswith(eos_text)
    model, sft = first.model, first.sft_params
    table = np.stack(
        [
            completion_logps(model, sft, step_tok, rows, "chosen"),
            completion_logps(model, sft, step_tok, rows, "rejected"),
            [r["chosen_visits"] for r in rows],
            [r["rejected_visits"] for r in rows],
        ],
        1,
    )
    matched = []
    for step, (c, r, rc, rr, nw, nl, eps) in enumerate(recorded):
        # the NumPy formula of the visit-count label smoothing
        np.testing.assert_allclose(eps, np.minimum(nl / (np.maximum(nw, 1.0) + nl), 0.5), rtol=1e-6)
        if step == 0:  # the policy starts at the SFT params, which are the reference
            np.testing.assert_allclose(np.stack([c, r]), np.stack([rc, rr]), atol=1e-5)
        # the frozen SFT reference at every step: each example is one row of the pairs file
        for row in np.stack([rc, rr, nw, nl], 1):
            hits = np.flatnonzero(np.all(np.isclose(table, row[None], atol=2e-4), axis=1))
            assert hits.size, f"step {step + 1}: example {row} is not a pair of {run['pairs_path']}"
            matched.append(int(hits[0]))
    # the first step's examples are distinct pairs of the file (one epoch is a permutation)
    b = len(recorded[0][0])
    assert len(set(matched[:b])) == b and b == iterate.round_batch_size(8, len(rows), jax.device_count())


def test_restart_skips_the_finished_round(run):
    first, second = run["first"], run["second"]
    assert fingerprint(first.params) == fingerprint(second.params)
    assert fingerprint(first.params) != fingerprint(first.sft_params)  # the round did train
    assert os.path.getmtime(run["pairs_path"]) == run["mtime"]
    assert run["rerun_recorded"] == []  # no train step ran
    done = json.load(open(os.path.join(run["workdir"], "round_0", "done.json")))
    assert done["fingerprint"] == fingerprint(first.params)
    s = {k: v for k, v in second.summary.items() if not k.startswith("wall_s")}
    f = {k: v for k, v in first.summary.items() if not k.startswith("wall_s")}
    assert s == f


def test_instance_budget_and_pairs(run):
    """Instance-level pairs spend the MCTS run's per-prompt token budget, rounded up to one sample."""
    config, first = run["config"], run["first"]
    task = mcts_dpo_job.make_task(config)
    prompts = iterate.round_prompts(task, 0, 4, 0)
    from alignjax.data.pipeline import resolve_tokenizer

    tok = resolve_tokenizer(config.data.tokenizer)

    def verify(prompt, completion):  # a stand-in verifier that splits random samples both ways
        return len(completion) % 2 == 0

    policy = iterate.Policy(
        first.model, first.sft_params, tok, verify, task.is_final_step, generator=first.generator
    )
    budgets = [12, 1, 40, 20]
    records, stats = iterate.instance_pairs(
        policy,
        prompts,
        budgets,
        jax.random.PRNGKey(1),
        max_samples=3,
        max_new_tokens=8,
        temperature=1.0,
        top_p=1.0,
    )
    out = policy.generator.generate(
        policy.params,
        [policy.prompt_ids(p) for p in prompts],
        jax.random.PRNGKey(1),
        num_samples=3,
        max_new_tokens=8,
        stop_tokens=(tok.eos_id,),
    )
    used_tokens = used = 0
    expected = []
    for i, b in enumerate(budgets):
        lengths = out.lengths[i]
        cum = np.cumsum(lengths)
        k = int(np.searchsorted(cum, b) + 1) if cum[-1] >= b else len(lengths)  # first k reaching b
        assert cum[k - 1] >= min(b, cum[-1]) and (k == 1 or cum[k - 2] < b)
        used_tokens += int(lengths[:k].sum())
        used += k
        texts = [completion_text(tok, out.row(i, j)[0]) for j in range(k)]
        good = [t for t in texts if verify(prompts[i], t)]
        bad = [t for t in texts if not verify(prompts[i], t)]
        if good and bad and good[0].strip() and bad[0].strip():
            expected.append({"prompt": prompts[i], "chosen": good[0], "rejected": bad[0]})
    assert stats["generated_tokens"] == used_tokens and stats["samples"] == used
    assert records == expected and stats["budget_tokens"] == sum(budgets)


def test_gsm8k_task(tmp_path):
    """A GSM8K-style JSONL is a task: prompts, SFT records, and a verifier reading the ``####`` answer."""
    rows = [
        {"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"{i}+2={i + 2}\n#### {i + 2}"}
        for i in range(5)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config()
    config.data.source = str(path)
    config.mcts_dpo.num_test = 2
    task = mcts_dpo_job.make_task(config)
    assert task.train_prompts == [r["question"] for r in rows[:3]]
    assert task.test_prompts == [r["question"] for r in rows[3:]]
    assert task.sft_records[0] == {"prompt": rows[0]["question"], "completion": rows[0]["answer"]}
    q = rows[4]["question"]
    assert task.verify(q, "4+2=6\n#### 6") and not task.verify(q, "4+2=7\n#### 7")
    assert task.is_final_step("#### 6") and not task.is_final_step("4+2=6\n")
    config.data.source = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="config.data.source"):
        mcts_dpo_job.make_task(config)
