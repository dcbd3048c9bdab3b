"""SPO ("Self-supervised Preference Optimization", arXiv 2409.17791) end to end.

The degraded responses remove the best-scored phrases of ``python-rake`` (the RAKE library itself is
the reference here), each pair's batch carries them as sequences 2B..4B-1 with their classes, and the
step's loss equals DPO plus degree_weight times a cross-entropy computed here in NumPy from the
policy's hidden states and the head's own weights, pooled over the degraded responses' tokens.
"""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import transformers
from RAKE import Rake, SmartStopList

import alignjax.losses as losses
from alignjax import main
from alignjax.data import PreferenceData, degrees
from alignjax.data.pipeline import resolve_tokenizer
from alignjax.export import export_run, load_run
from alignjax.models import AUX_HEADS, ModelConfig
from alignjax.train import step as steplib
from alignjax.train.loop import run_train
from tests.hf_fixtures import save_tokenizer
from tests.train.conftest import SMALL, run_config, small_model

B = 4
REMOVALS = 2
SUBJECTS = ["The quick brown fox", "A lazy old dog", "Seven tired sailors", "The bright morning sun"]
VERBS = ["jumps over the garden fence", "sleeps under a wooden table", "sings loud sea shanties",
         "warms the cold mountain lake"]


def _rows(n=16):
    rows = []
    for i in range(n):
        s, v = SUBJECTS[i % 4], VERBS[(i // 4) % 4]
        rows.append(dict(prompt=f"Story {i}:", chosen=f" {s} {v} near the red barn, happily.",
                         rejected=f" {s} quietly {v}."))
    return rows


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("spo_tok")
    save_tokenizer(str(path))
    return str(path)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_degraded_responses_remove_the_best_rake_phrases():
    rake = Rake(SmartStopList())
    text = "The Eiffel Tower, built in 1889, is the most famous landmark of Paris."
    ranked = [p for p, _ in rake.run(text)]
    for r in range(4):
        degraded, removed = degrees.degrade(text, r)
        assert removed == r
        for phrase in ranked[:r]:
            assert phrase not in degraded.lower()
        for phrase in ranked[r:]:
            assert phrase in degraded.lower()
    # A response keeps at least one phrase; a row's degrees are a function of its texts.
    assert degrees.degrade("Paris.", 2) == ("Paris.", 0)
    row = _rows()[5]
    assert degrees.degraded_pair(row["chosen"], row["rejected"], REMOVALS) == \
        degrees.degraded_pair(row["chosen"], row["rejected"], REMOVALS)
    labels = {tuple(degrees.degraded_pair(r["chosen"], r["rejected"], REMOVALS)[1]) for r in _rows()}
    assert {w for w, _ in labels} <= set(range(3)) and {x for _, x in labels} <= set(range(3, 6))
    assert len({w for w, _ in labels}) > 1  # the degrees vary over rows


def _np_ce(logits, labels):
    z = np.asarray(logits, np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


def test_spo_step_is_dpo_plus_degree_ce_on_the_degraded_responses(tmp_path, tokenizer_dir):
    rows = _rows()
    data = PreferenceData(str(_write(tmp_path / "pairs.jsonl", rows)), tokenizer_dir, kind="pairwise",
                          batch_size=B, max_length=48, buckets=(48,), seed=0, shuffle=False,
                          process_index=0, process_count=1, degree_removals=REMOVALS)
    host = next(data)
    assert host["input_ids"].shape[0] == 4 * B
    tok = resolve_tokenizer(tokenizer_dir)
    for i, (ex, row) in enumerate(zip(data.examples[:B], rows)):
        texts, labels = degrees.degraded_pair(row["chosen"], row["rejected"], REMOVALS)
        np.testing.assert_array_equal(host["degree_labels"][i], labels)
        for j, text in enumerate(texts):
            seq = host["input_ids"][(2 + j) * B + i][host["segment_ids"][(2 + j) * B + i] > 0].tolist()
            assert seq == (ex.prompt + tok.encode(text) + [tok.eos_id])[:48]  # cut to max_length

    classes = degrees.num_classes(REMOVALS)
    model = small_model()
    model = type(model)(model.config.replace(vocab_size=tok.vocab_size, aux_heads=(("spo_degree", classes),)))
    params, ref_params = model.init(jax.random.PRNGKey(1)), model.init(jax.random.PRNGKey(2))
    config = ml_collections.ConfigDict(dict(loss=dict(name="spo", beta=0.2, degree_weight=0.5),
                                            data=dict(kind="pairwise"), train=dict(nan_at_step=-1)))
    spec = steplib.make_step_spec(config, B, "model")
    assert steplib.aux_heads(spec.required, dict(spec.provider_hyperparameters)) == (("spo_degree", classes),)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    got, _ = jax.jit(steplib.make_loss_fn(model, spec))(params, ref_params, None, batch)

    # Independently: summed completion log-probs for DPO, mean completion states through the head.
    def seq_logps(p):
        logits = np.asarray(model.apply(p, batch["input_ids"]), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        ids = host["input_ids"]
        tok_lp = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
        return (tok_lp * host["loss_mask"][:, 1:]).sum(1)

    pol, ref = seq_logps(params), seq_logps(ref_params)
    dpo = losses.get("sigmoid")(chosen_logps=jnp.asarray(pol[:B]), rejected_logps=jnp.asarray(pol[B : 2 * B]),
                                ref_chosen_logps=jnp.asarray(ref[:B]),
                                ref_rejected_logps=jnp.asarray(ref[B : 2 * B]), beta=0.2)
    hidden = np.asarray(model.hidden(params, batch["input_ids"]), np.float64)
    mask = host["loss_mask"][2 * B :]
    pooled = (hidden[2 * B :] * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # [2B, D]
    head = params[AUX_HEADS]
    logits = pooled @ np.asarray(head["spo_degree_kernel"]) + np.asarray(head["spo_degree_bias"])
    ce = _np_ce(np.stack([logits[:B], logits[B:]], 1), host["degree_labels"]).mean(1)
    np.testing.assert_allclose(float(got), np.mean(np.asarray(dpo) + 0.5 * ce), rtol=2e-5)


def test_spo_trains_its_head_through_run_train_and_refuses_a_model_without_it(tmp_path, tokenizer_dir):
    source = _write(tmp_path / "pairs.jsonl", _rows(32))
    config = run_config("spo", source, steps=4, max_length=48, beta=0.1, degree_weight=1.0)
    config.data.tokenizer = tokenizer_dir
    config.model.overrides.vocab_size = 0  # the tokenizer's
    config.optim.learning_rate = 1e-2
    main.run(config, str(tmp_path / "run"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)

    run = load_run(str(tmp_path / "run"))
    assert run.model.config.aux_heads == (("spo_degree", degrees.num_classes(REMOVALS)),)
    fresh = run.model.init_aux_heads(jax.random.PRNGKey(1))
    trained = run.params[AUX_HEADS]
    assert not np.allclose(np.asarray(trained["spo_degree_kernel"]), np.asarray(fresh["spo_degree_kernel"]))
    # The exported HF model is the decoder alone, and transformers loads it.
    export_run(str(tmp_path / "run"), str(tmp_path / "hf"))
    transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))

    given = small_model()
    with pytest.raises(ValueError, match=r"reads the policy's 'spo_degree' classifier \(6 classes\)"):
        run_train(config, str(tmp_path / "given"), model=given)


def test_model_config_aux_heads_round_trip_as_json():
    config = ModelConfig(**SMALL, aux_heads=[["spo_degree", 6]])
    assert config.aux_heads == (("spo_degree", 6),)
    with pytest.raises(ValueError, match="at least 1 output"):
        ModelConfig(aux_heads=(("x", 0),))
