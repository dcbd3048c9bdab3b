"""Reward models end to end: scoring vs NumPy, BT reaches the known ceiling, Secrets-II recovers from
label noise, the GPM cyclic table (tiny), HF export parity with transformers, checkpoint reload of
GPM/PAL heads, bad input."""

import json
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from alignjax import sharding  # noqa: E402
from alignjax.data import DataError, batching, resolve_tokenizer  # noqa: E402
from alignjax.data.tokenize import tokenize_record  # noqa: E402
from alignjax.eval import rewardbench  # noqa: E402
from alignjax.export import load_checkpoint_params  # noqa: E402
from alignjax.jobs.reward_model import train_and_score  # noqa: E402
from alignjax.models import PRESETS, Model  # noqa: E402
from alignjax.models.heads import HeadConfig  # noqa: E402
from alignjax.reward import synthetic as S  # noqa: E402
from alignjax.reward.evaluate import rewardbench_report, score_pairs  # noqa: E402
from alignjax.reward.export import load_classifier, save_classifier  # noqa: E402
from alignjax.reward.model import RewardModel  # noqa: E402
from alignjax.reward.train import train_reward_model  # noqa: E402
from experiments import reward_model as R  # noqa: E402

SMALL = dict(vocab_size=16, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
TOK = resolve_tokenizer("arithmetic")


def small_config(objective, source, steps, *, lr=3e-3, batch_size=32):
    c = R.get_config(f"objective={objective},runlocal")
    c.model.overrides.update(SMALL)
    c.data.source, c.data.eval_source = source, ""
    c.data.max_length = 12
    c.data.batch_size, c.data.eval_batch_size = batch_size, 64
    c.train.num_steps = c.train.checkpoint_every = steps
    c.train.progress = c.train.plot = c.train.tensorboard = False
    c.optim.learning_rate, c.optim.warmup_steps, c.optim.schedule = lr, 0, "constant"
    return c


def accuracy_on(config, result, path):
    from alignjax.reward.evaluate import score_file

    return score_file(config, result.model, result.params, path)["accuracy"]


@pytest.fixture(scope="module")
def linear_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("linear")
    w = S.linear_weights(0)
    train, _ = S.linear_bt_pairs(2000, weights=w, seed=1)
    held, held_diffs = S.linear_bt_pairs(512, weights=w, seed=2)
    return {
        "train": S.write_jsonl(train, str(d / "train.jsonl")),
        "eval": S.write_jsonl(held, str(d / "eval.jsonl")),
        "ceiling": S.ceiling(held_diffs),
        "dir": d,
    }


@pytest.fixture(scope="module")
def bt_run(linear_data):
    c = small_config("bt", linear_data["train"], 200)
    return c, train_reward_model(c, str(linear_data["dir"] / "bt"))


# ------------------------------------------------------------------------------------------ scoring


def test_scoring_equals_numpy():
    """Value rewards (last completion token), GPM pair scores and the RewardBench report vs NumPy."""
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    decoder = Model(PRESETS["tiny"].replace(**SMALL))
    rows = [
        {"prompt": "1+", "chosen": "23", "rejected": "4", "subset": "alpacaeval-easy"},
        {"prompt": "12+3=", "chosen": "5", "rejected": "678", "subset": "alpacaeval-easy"},
        {"prompt": "9", "chosen": "0", "rejected": "11", "subset": "math-prm"},
        {"prompt": "4=", "chosen": "77", "rejected": "7", "subset": "custom"},
        {"prompt": "3", "chosen": "45", "rejected": "54", "subset": "custom"},
    ]
    examples = [tokenize_record(r, TOK, max_length=None, where=f"t:{i}") for i, r in enumerate(rows)]
    subsets = [r["subset"] for r in rows]
    key = jax.random.PRNGKey(3)
    # A padded batch of all pairs, read by NumPy: each sequence's last non-pad token.
    host = batching.make_batch(examples, "padded", pad_id=TOK.pad_id, buckets=(16,))
    n = len(rows)
    for kind in ("value", "gpm"):
        rm = RewardModel(decoder, HeadConfig(kind=kind, gpm_dim=4, gpm_prompt_scales=True))
        params = rm.init(key)
        params["head"] = jax.tree.map(lambda x: x * 50.0, params["head"])  # scores away from 0
        got = score_pairs(rm, params, examples, mesh=mesh, batch_size=8, pad_id=TOK.pad_id)
        hidden = np.asarray(
            decoder.hidden(
                params["decoder"],
                host["input_ids"],
                positions=host["positions"],
                segment_ids=host["segment_ids"],
            ),
            np.float64,
        )
        nonpad = host["input_ids"] != TOK.pad_id
        last = np.array([np.max(np.nonzero(row)[0]) for row in nonpad])
        first_completion = np.array([np.min(np.nonzero(m)[0]) for m in host["loss_mask"]])
        feats = hidden[np.arange(2 * n), last]
        if kind == "value":
            r = feats @ np.asarray(params["head"]["score"], np.float64)[:, 0]
            want = r[:n] - r[n:]
            np.testing.assert_allclose(got["chosen_rewards"], r[:n], rtol=1e-4, atol=1e-5)
        else:
            h = params["head"]
            v = feats @ np.asarray(h["embed"], np.float64)
            v /= np.linalg.norm(v, axis=-1, keepdims=True)
            pf = hidden[np.arange(2 * n), first_completion - 1][:n]
            z = pf @ np.asarray(h["scale_gate"], np.float64) + np.asarray(h["scale_bias"])
            lam = np.log1p(np.exp(z))
            a, b = v[:n].reshape(n, 2, 2), v[n:].reshape(n, 2, 2)
            want = np.sum(lam * (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]), axis=-1)
        np.testing.assert_allclose(got["scores"], want, rtol=1e-4, atol=1e-5)
        report = rewardbench_report(got, subsets)
        correct = want > 0
        assert report["accuracy"] == pytest.approx(correct.mean())
        per = {s: correct[np.array(subsets) == s].mean() for s in set(subsets)}
        assert {s: v["accuracy"] for s, v in report["subsets"].items()} == pytest.approx(per)
        chat = per["alpacaeval-easy"]
        assert report["sections"]["Chat"] == pytest.approx(chat)
        assert report["sections"]["Reasoning"] == pytest.approx(per["math-prm"])
        assert report["sections"]["Safety"] == 0  # absent: RewardBench reports 0
    # Ties are wrong.
    tie = {"scores": np.zeros(2), "chosen_rewards": np.ones(2), "rejected_rewards": np.ones(2)}
    assert rewardbench_report(tie, ["a", "a"])["accuracy"] == 0.0
    assert rewardbench.subset_accuracies(["a"], np.ones(1), np.ones(1))[0]["a"] == 0.0


# ------------------------------------------------------------------------------------------ training


def test_bt_reaches_known_ceiling(bt_run, linear_data):
    """Labels sampled from BT with a known linear reward: held-out accuracy within 2 points of the
    accuracy of the true reward on the same labels."""
    c, result = bt_run
    acc = accuracy_on(c, result, linear_data["eval"])
    print(f"BT held-out accuracy {acc:.4f}, ceiling {linear_data['ceiling']:.4f}")
    assert abs(acc - linear_data["ceiling"]) <= 0.02
    rows = [json.loads(line) for line in open(os.path.join(linear_data["dir"], "bt", "metrics.jsonl"))]
    assert {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(rows[0])
    assert rows[0]["rewards/margins"] == pytest.approx(
        rows[0]["rewards/chosen"] - rows[0]["rewards/rejected"], abs=1e-5
    )


def test_secrets_flipping_recovers_from_label_noise(tmp_path):
    """30% of 256 training labels flipped on top of BT sampling; plain BT (400 steps) vs the Secrets-II
    pipeline (ensemble of 4 independent reward models, 100 steps each -> strength -> flip the lowest
    30% where mu < 0 -> retrain), on two seeds (reward weights, data, initialisation) of the
    reproduction (alignjax/repro/secrets_noise.py; docs/reproductions.md has three). The flips find
    wrong labels (their share of wrong labels at least 1.5 times the base rate: measured 0.86 and 0.75
    against 0.37 and 0.39); Secrets-II beats plain BT
    on each seed and by >= 0.03 held-out accuracy on average. Measured on a 2-core Intel Xeon:
    seed 0 plain 0.689 / Secrets-II 0.719, seed 1 0.539 / 0.672 on the 8-device test mesh (0.693 /
    0.734 and 0.555 / 0.660 on the default devices: one seed's gain moves with rounding)."""
    from alignjax.repro import common
    from alignjax.repro.secrets_noise import run_one
    from experiments import repro_secrets_noise

    params = common.repro_params(repro_secrets_noise.get_config(), "repro_secrets_noise")
    cells = [run_one(params, str(tmp_path / f"seed{seed}"), seed, noise=0.3) for seed in (0, 1)]
    print(cells)
    strength = [json.loads(line) for line in open(tmp_path / "seed0" / "secrets" / "strength.jsonl")]
    assert len(strength) == 256 and all("margin" in r and r["strength_std"] >= 0 for r in strength)
    members = sorted(os.listdir(tmp_path / "seed0" / "secrets" / "ensemble"))
    assert members == [f"member_{m}" for m in range(4)]  # separately trained, seeds 1..4
    assert np.mean([r["strength_std"] > 0 for r in strength]) > 0.99  # independent members disagree
    for cell in cells:
        assert cell["flipped"] > 0
        assert cell["flipped_wrong_share"] >= 1.5 * cell["wrong_label_share"]
        assert cell["secrets_accuracy"] > cell["plain_accuracy"]
    gains = [c["secrets_accuracy"] - c["plain_accuracy"] for c in cells]
    assert np.mean(gains) >= 0.03


def test_gpm_cyclic_table_tiny(tmp_path):
    """One seed of experiments/gpm_cyclic.py: GPM ~100%, BT near chance (<= 2/3 bound); GPM head reloads."""
    from experiments import gpm_cyclic

    acc = {}
    for objective in ("bt", "gpm"):
        c = gpm_cyclic.get_config(f"objective={objective},seed=0,steps=150,data_dir={tmp_path}/data")
        result = train_and_score(c, str(tmp_path / objective))
        acc[objective] = result.summary["rewardbench"]["accuracy"]
    print(f"cyclic: bt {acc['bt']:.4f} gpm {acc['gpm']:.4f}")
    assert acc["gpm"] >= 0.95
    assert acc["bt"] <= 0.70
    reloaded = load_checkpoint_params(str(tmp_path / "gpm"))
    final = jax.tree.map(np.asarray, result.params)
    jax.tree.map(np.testing.assert_array_equal, reloaded, final)
    text = gpm_cyclic.table_markdown({"bt": [acc["bt"]], "gpm": [acc["gpm"]]}, "cmd")
    assert "## GPM cyclic preferences" in text and f"{acc['gpm'] * 100:.1f}" in text


def test_pal_head_trains_and_reloads(tmp_path):
    rows = [
        dict(r, user_id=i % 2) for i, r in enumerate(S.linear_bt_pairs(64, weights=S.linear_weights(0))[0])
    ]
    c = small_config("pal", S.write_jsonl(rows, str(tmp_path / "pal.jsonl")), 4)
    c.reward.pal_users = 2
    params = jax.tree.map(np.asarray, train_reward_model(c, str(tmp_path / "pal")).params)
    assert set(params["head"]) == {"proj", "prototypes", "user_logits", "log_scale"}
    assert params["head"]["user_logits"].shape == (2, 2)
    assert np.any(params["head"]["user_logits"][0] != params["head"]["user_logits"][1])  # per-user weights
    jax.tree.map(np.testing.assert_array_equal, load_checkpoint_params(str(tmp_path / "pal")), params)


# ------------------------------------------------------------------------------------------ export


def test_export_transformers_parity(bt_run, tmp_path):
    """The trained BT model as LlamaForSequenceClassification: transformers' reward (last non-pad token
    via pad_token_id) equals alignjax's, and the directory loads back."""
    import torch
    from transformers import AutoModelForSequenceClassification

    c, result = bt_run
    model, params = result.model, jax.tree.map(np.asarray, result.params)
    path = str(tmp_path / "hf")
    save_classifier(model, params, path, pad_token_id=TOK.pad_id)
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    assert cfg["pad_token_id"] == TOK.pad_id
    ids = np.array(
        [[4, 5, 13, 6, 7, 2, 0, 0], [8, 3, 9, 10, 11, 12, 4, 2], [5, 2, 0, 0, 0, 0, 0, 0]], np.int32
    )
    ours = np.asarray(model.rewards(params, ids, pad_id=TOK.pad_id))
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = (
            hf(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(ids != TOK.pad_id, dtype=torch.long),
            )
            .logits[:, 0]
            .numpy()
        )
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    back = load_classifier(path)
    assert back.pad_token_id == TOK.pad_id
    np.testing.assert_allclose(
        np.asarray(back.rewards(back.params, ids, pad_id=TOK.pad_id)), ours, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="only value heads"):
        save_classifier(
            RewardModel(model.decoder, HeadConfig(kind="gpm")), params, str(tmp_path / "x"), pad_token_id=0
        )


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+", "chosen": "2", "rejected": "3"}\n{"prompt": "1+", "chosen": "2"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*rejected"):
        train_reward_model(small_config("bt", str(bad), 2, batch_size=8), str(tmp_path / "w"))
    with pytest.raises(ValueError, match="objective='nope'"):
        R.get_config("objective=nope")
    good = S.write_jsonl(S.linear_bt_pairs(64, weights=S.linear_weights(0))[0], str(tmp_path / "good.jsonl"))
    c = small_config("gpm", good, 2)
    c.loss.beta = 0.1
    with pytest.raises(ValueError, match=r"config\.loss\.beta.*tau"):
        train_reward_model(c, str(tmp_path / "w2"))
    c = small_config("secrets", str(bad), 2)  # secrets_rm straight on data without strengths
    with pytest.raises(ValueError, match="reward.objective"):
        c.reward.objective = "nope"
        train_reward_model(c, str(tmp_path / "w3"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_classifier(str(tmp_path))
