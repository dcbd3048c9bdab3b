"""The scoring job against an independent per-sequence NumPy computation on saved tiny checkpoints."""

import json

import jax
import numpy as np
import pytest

from alignjax import models, sharding
from alignjax.data import synthetic
from alignjax.eval.scoring import score_examples
from alignjax.jobs import score as score_job
from experiments import score as score_experiment

PAIRS = [
    {"prompt": "12+34=", "chosen": "64", "rejected": "65", "subset": "math-prm"},
    {"prompt": "58+67=", "chosen": "521", "rejected": "511", "subset": "math-prm"},
    {"prompt": "9+9=", "chosen": "81", "rejected": "8", "subset": "hep-go"},
    {"prompt": "40+2=", "chosen": "24", "rejected": "2400", "subset": "custom"},
    {"prompt": "77+77=", "chosen": "451", "rejected": "441", "subset": "custom"},
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A policy and a reference: the tiny preset and a perturbed copy, saved in the HF layout."""
    root = tmp_path_factory.mktemp("score")
    config = models.PRESETS["tiny"].replace(vocab_size=32)
    model = models.Model(config)
    ref_params = model.init(jax.random.PRNGKey(1))
    leaves, treedef = jax.tree.flatten(ref_params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    policy_params = treedef.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    )
    models.save_pretrained(model, policy_params, str(root / "policy"))
    models.save_pretrained(model, ref_params, str(root / "reference"))
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return root, model, policy_params, ref_params


def _numpy_logps(model, params, tokenizer, prompt, completion):
    """Sum of log p(completion tokens | prefix), one unpadded sequence at a time, log-softmax in NumPy."""
    p_ids = tokenizer.encode_prompt(prompt)
    c_ids = tokenizer.encode_completion(prompt, completion, p_ids)
    ids = np.array([p_ids + c_ids], np.int32)
    logits = np.asarray(model.apply(params, ids), np.float64)[0]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = logits - logz[:, None]
    return sum(logp[t - 1, ids[0, t]] for t in range(len(p_ids), ids.shape[1]))


@pytest.mark.parametrize("mode", ["ref", "sum"])
def test_scoring_job_matches_numpy(checkpoints, tmp_path, mode):
    root, model, policy_params, ref_params = checkpoints
    tokenizer = synthetic.arithmetic_tokenizer()
    config = score_experiment.get_config(
        f"model={root / 'policy'},reference={root / 'reference' if mode == 'ref' else ''},mode={mode}"
    )
    config.data.source = str(root / "pairs.jsonl")
    config.data.eval_batch_size = 8  # 5 pairs: one padded batch; the copies must be discarded
    config.data.max_length = 0
    summary = score_job.run(config, str(tmp_path))

    rewards = []
    for pair in PAIRS:
        r = []
        for completion in (pair["chosen"], pair["rejected"]):
            value = _numpy_logps(model, policy_params, tokenizer, pair["prompt"], completion)
            if mode == "ref":
                value -= _numpy_logps(model, ref_params, tokenizer, pair["prompt"], completion)
            r.append(value)
        rewards.append(r)
    rewards = np.array(rewards)
    correct = rewards[:, 0] > rewards[:, 1]
    assert summary["num_pairs"] == len(PAIRS)
    assert summary["accuracy"] == pytest.approx(correct.mean())
    assert summary["reward_margin_mean"] == pytest.approx(np.mean(rewards[:, 0] - rewards[:, 1]), abs=1e-4)
    assert summary["subsets"]["custom"]["accuracy"] == pytest.approx(correct[3:].mean())
    reasoning = (984 * correct[:2].mean() + 164 * correct[2]) / (984 + 164)
    assert summary["sections"]["Reasoning"] == pytest.approx(reasoning)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["accuracy"] == summary["accuracy"]


def test_ref_mode_without_reference_is_a_clear_error(checkpoints, tmp_path):
    root, *_ = checkpoints
    config = score_experiment.get_config(f"model={root / 'policy'},mode=ref")
    with pytest.raises(ValueError, match="config.reference.path"):
        score_job.run(config, str(tmp_path))


def test_a_scanned_policy_scores_against_an_unrolled_reference(checkpoints):
    """A policy trained with scanned layers (the real presets' layout) scored against an HF reference
    loaded unrolled: each is applied with its own model, and the rewards are the per-sequence NumPy
    log-ratios of the unrolled models."""
    root, model, policy_params, ref_params = checkpoints
    tokenizer = synthetic.arithmetic_tokenizer()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    policy = models.from_pretrained(str(root / "policy"), mesh=mesh, scan_layers=True)
    reference = models.from_pretrained(str(root / "reference"), mesh=mesh)
    assert "layers" in policy.params and "layers_0" in reference.params
    pairs, expected = [], []
    for pair in PAIRS:
        text, prompt = pair["prompt"], tokenizer.encode_prompt(pair["prompt"])
        sides = [prompt + tokenizer.encode_completion(text, pair[k], prompt) for k in ("chosen", "rejected")]
        pairs.append(tuple((ids, len(prompt)) for ids in sides))
        expected.append(
            [
                _numpy_logps(model, policy_params, tokenizer, pair["prompt"], pair[k])
                - _numpy_logps(model, ref_params, tokenizer, pair["prompt"], pair[k])
                for k in ("chosen", "rejected")
            ]
        )
    scores = score_examples(
        policy, policy.params, reference, pairs, mode="ref", mesh=mesh, batch_size=4, pad_id=tokenizer.pad_id,
        max_length=None,
    )
    got = np.stack([scores["chosen_rewards"], scores["rejected_rewards"]], axis=1)
    np.testing.assert_allclose(got, np.array(expected), atol=1e-4)
