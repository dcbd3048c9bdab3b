"""Losses that read sequences other than the pair's completions: DOVE's instructions, rationales.

DOVE ("Comparing Bad Apples to Good Oranges", arXiv 2404.00530) scores each side's instruction as
well as its response, on rows whose sides have their own instruction; Rationale-DPO ("Data-Centric
Human Preference Optimization with Rationales", arXiv 2407.14477) adds the rationale's
log-likelihood on a third sequence. The step's loss equals the registered base loss applied to
log-probs computed here independently in NumPy over the tokens each paper scores; DOVE with equal
instructions trains exactly as DPO does; both train through ``run_train``.
"""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import alignjax.losses as losses
from alignjax.data import PreferenceData, synthetic, tokenize_record
from alignjax.data.pipeline import resolve_tokenizer
from alignjax.sharding import global_sequence_ids
from alignjax.train import step as steplib
from alignjax.train.loop import run_train
from tests.train.conftest import run_config, small_model

B = 8
TEMPLATE = "+{chosen}={rejected}="  # the arithmetic tokenizer knows only digits, + and =


def _pairs(n=32):
    return synthetic.records("arithmetic_dpo", "train")[:n]


def _dove_rows(same_instruction=False):
    recs = _pairs()
    return [dict(chosen_prompt=a["prompt"], chosen=a["chosen"],
                 rejected_prompt=a["prompt"] if same_instruction else b["prompt"], rejected=a["rejected"])
            for a, b in zip(recs, recs[3:] + recs[:3])]


def _rationale_rows():
    return [dict(r, rationale=r["chosen"][::-1]) for r in _pairs()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(path, **kw):
    return PreferenceData(str(path), "arithmetic", kind="pairwise", batch_size=B, max_length=24,
                          buckets=(24,), seed=0, shuffle=False, process_index=0, process_count=1, **kw)


def _np_token_logps(logits, ids):
    """log p(ids[r, t] | ids[r, <t]) in float64, 0 at t = 0."""
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    out = np.zeros(ids.shape)
    out[:, 1:] = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    return out


def _step_loss(loss, host, **hyper):
    model = small_model()
    params, ref_params = model.init(jax.random.PRNGKey(1)), model.init(jax.random.PRNGKey(2))
    config = ml_collections.ConfigDict(dict(loss=dict(name=loss, **hyper), data=dict(kind="pairwise"),
                                            train=dict(nan_at_step=-1)))
    spec = steplib.make_step_spec(config, B, "model")
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    got, (metrics, _) = jax.jit(steplib.make_loss_fn(model, spec))(params, ref_params, None, batch)
    ids = np.asarray(host["input_ids"])
    pol = _np_token_logps(model.apply(params, batch["input_ids"]), ids)
    ref = _np_token_logps(model.apply(ref_params, batch["input_ids"]), ids)
    return float(got), metrics, pol, ref


def test_each_dove_side_is_the_standard_tokenization_of_its_own_row(tmp_path):
    """A side's sequence is exactly prompt + completion as a standard (TRL-tokenized) row has it."""
    rows = _dove_rows()
    data = _data(_write(tmp_path / "dove.jsonl", rows))
    tok = resolve_tokenizer("arithmetic")
    for ex, row in zip(data.examples[:B], rows):
        for j, side in enumerate(("chosen", "rejected")):
            other = "rejected" if side == "chosen" else "chosen"
            alone = {"prompt": row[f"{side}_prompt"], "chosen": row[side], "rejected": row[other]}
            std = tokenize_record(alone, tok, max_length=24)
            assert ex.completions[j] == std.prompt + std.completions[0]
            assert ex.prefix_length(j) == len(std.prompt)


def test_dove_step_is_dpo_on_joint_instruction_and_response_logps(tmp_path):
    host = next(_data(_write(tmp_path / "dove.jsonl", _dove_rows())))
    got, metrics, pol, ref = _step_loss("dove", host, beta=0.3)
    mask, inside = host["loss_mask"], (host["segment_ids"] > 0) & (host["positions"] > 0)
    instruction = inside & (mask == 0)
    ids = host["input_ids"] * instruction
    assert instruction[:B].sum() > 0 and (ids[:B] != ids[B:]).any(axis=1).all()  # instructions differ
    joint = lambda lp: (lp * inside).sum(1)  # noqa: E731  every token but the first: log pi(I) + log pi(R | I)
    pol_j, ref_j = jnp.asarray(joint(pol)), jnp.asarray(joint(ref))
    want = losses.get("sigmoid")(chosen_logps=pol_j[:B], rejected_logps=pol_j[B:], ref_chosen_logps=ref_j[:B],
                                 ref_rejected_logps=ref_j[B:], beta=0.3)
    np.testing.assert_allclose(got, np.mean(want), rtol=2e-5)
    # TRL's reward metrics stay those of the responses alone
    response = (pol - ref) * mask
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.3 * response[:B].sum(1).mean(), rtol=2e-5)


def test_rationale_dpo_step_is_dpo_minus_gamma_rationale_loglik(tmp_path):
    data = _data(_write(tmp_path / "rationale.jsonl", _rationale_rows()), rationale_template=TEMPLATE)
    host = next(data)
    assert host["input_ids"].shape[0] == 3 * B
    tok = resolve_tokenizer("arithmetic")
    ex = data.examples[0]
    third = host["input_ids"][2 * B][host["segment_ids"][2 * B] > 0].tolist()
    record = _rationale_rows()[0]
    filled = TEMPLATE.format(chosen=record["chosen"], rejected=record["rejected"])
    assert third == ex.prompt + tok.encode(filled) + tok.encode(record["rationale"]) + [tok.eos_id]
    got, metrics, pol, ref = _step_loss("rationale_dpo", host, beta=0.2, rationale_gamma=0.5)
    seq = lambda lp: (lp * host["loss_mask"]).sum(1)  # noqa: E731
    pw, pl, pr = seq(pol)[:B], seq(pol)[B : 2 * B], seq(pol)[2 * B :]
    rw, rl = seq(ref)[:B], seq(ref)[B : 2 * B]
    rationale_tokens = host["loss_mask"][2 * B :].sum(1)
    want_tokens = [len(tok.encode(r["rationale"])) + 1 for r in _rationale_rows()[:B]]
    np.testing.assert_array_equal(rationale_tokens, want_tokens)
    args = dict(chosen_logps=pw, rejected_logps=pl, ref_chosen_logps=rw, ref_rejected_logps=rl)
    dpo = losses.get("sigmoid")(**{k: jnp.asarray(v) for k, v in args.items()}, beta=0.2)
    np.testing.assert_allclose(got, np.mean(np.asarray(dpo) - 0.5 * pr), rtol=2e-5)
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.2 * (pw - rw).mean(), rtol=2e-5)


def _config(loss, path, steps=3):
    return run_config(loss, path, steps=steps, max_length=24)


def _metrics(workdir):
    return [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r]


def test_dove_with_equal_instructions_trains_as_dpo(tmp_path):
    """Same instruction on both sides: log pi(I) cancels, so three steps give DPO's metrics."""
    dove = _config("dove", _write(tmp_path / "dove.jsonl", _dove_rows(same_instruction=True)))
    dpo = _config("sigmoid", _write(tmp_path / "std.jsonl", [
        dict(prompt=r["chosen_prompt"], chosen=r["chosen"], rejected=r["rejected"])
        for r in _dove_rows(same_instruction=True)]))
    run_train(dove, str(tmp_path / "dove"))
    run_train(dpo, str(tmp_path / "dpo"))
    a, b = _metrics(tmp_path / "dove"), _metrics(tmp_path / "dpo")
    assert [r["step"] for r in a] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), key


def test_rationale_dpo_trains_from_the_data_cache_and_names_a_row_without_a_rationale(tmp_path):
    config = _config("rationale_dpo", _write(tmp_path / "rationale.jsonl", _rationale_rows()))
    config.data.rationale_template = TEMPLATE
    config.loss.rationale_gamma = 0.1
    run_train(config, str(tmp_path / "run"))
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "run" / "data_cache").is_dir()

    broken = _rationale_rows()
    del broken[4]["rationale"]
    config.data.source = str(_write(tmp_path / "broken.jsonl", broken))
    with pytest.raises(ValueError, match=rf"^{tmp_path}/broken.jsonl:5: missing field 'rationale'"):
        run_train(config, str(tmp_path / "broken"))


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_ids_of_several_processes_number_sequences_as_one_process_would(monkeypatch, parts):
    """Two processes' batches of b examples, globalized, sum each sequence's tokens exactly as one
    process's batch of the 2b examples does (pairs, pairs with rationales, listwise K = 4)."""
    b, t = 3, 5
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 9, (parts, 2 * b, t))  # [part, example, token]

    def host(examples):
        rows = np.concatenate([tokens[j, examples] for j in range(parts)])
        ids = np.repeat(np.arange(parts * len(examples)), t).reshape(-1, t)
        return {"input_ids": rows, "example_ids": ids.astype(np.int32),
                "lengths": np.ones((len(examples), parts), np.int32)}

    def sums(batch):
        return np.bincount(batch["example_ids"].ravel(), batch["input_ids"].ravel())

    want = sums(host(np.arange(2 * b)))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    pieces = []
    for p in range(2):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        pieces.append(global_sequence_ids(host(np.arange(p * b, (p + 1) * b))))
    got = sums({k: np.concatenate([x[k] for x in pieces]) for k in ("input_ids", "example_ids")})
    np.testing.assert_array_equal(got, want)
