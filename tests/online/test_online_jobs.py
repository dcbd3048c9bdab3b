"""The online jobs end to end through ``alignjax.main``: each experiment's runlocal, GRPO stopped and
continued to the same metrics.jsonl as an uninterrupted run, TRL's metric names, the first on-policy
step at the reference (KL 0, nothing clipped), and online DPO's rounds (pairs, training, a rerun that
reuses them)."""

import json
import os

import numpy as np
import pytest

from alignjax import main as entry
from alignjax.online import train as online

TRL_NAMES = {"reward", "reward_std", "frac_reward_zero_std", "clip_ratio/low_mean", "clip_ratio/high_mean",
             "clip_ratio/region_mean", "completions/mean_length", "completions/min_length",
             "completions/max_length", "completions/clipped_ratio", "loss", "grad_norm", "learning_rate"}


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _grpo(steps):
    """GRPO runlocal from the random init with a Follow-up Likelihood reward under the initial policy (a
    varied reward, so advantages, the KL and the gradients are non-zero), beta 0.04."""
    c = entry.load_config_file("experiments/grpo.py:runlocal,beta=0.04")
    c.online.sft_steps = 0
    c.online.reward = "flr"
    c.online.follow_ups = "1|00"
    c.online.negative_follow_ups = "9"
    c.online.num_test = 8
    c.train.num_steps = steps
    return c


def test_grpo_resumes_to_the_uninterrupted_metrics(tmp_path):
    clean, stopped = str(tmp_path / "clean"), str(tmp_path / "stopped")
    summary = entry.run(_grpo(4), clean)
    entry.run(_grpo(2), stopped)
    entry.run(_grpo(4), stopped)  # resumes from step 2: rollouts recomputed from the restored params
    rows = _rows(clean)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows == _rows(stopped)  # every metric, bit for bit
    assert TRL_NAMES | {"kl"} <= set(rows[0])
    # step 1 is on-policy and at the reference: KL 0 and nothing clipped, exactly
    assert rows[0]["kl"] == 0.0 and rows[0]["clip_ratio/region_mean"] == 0.0
    assert rows[-1]["kl"] > 0.0 and all(r["reward_std"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert 0.0 <= summary["task_accuracy/final"] <= 1.0


def _ppo(steps):
    c = entry.load_config_file("experiments/ppo.py:runlocal")
    c.online.sft_steps = 0
    c.online.reward = "flr"
    c.online.follow_ups = "1"
    c.online.num_test = 8
    c.train.num_steps = steps
    return c


def test_ppo_runlocal_resumes_to_the_uninterrupted_metrics(tmp_path):
    clean, stopped = str(tmp_path / "clean"), str(tmp_path / "stopped")
    summary = entry.run(_ppo(4), clean)
    entry.run(_ppo(2), stopped)
    entry.run(_ppo(4), stopped)
    rows = _rows(clean)
    assert rows == _rows(stopped) and [r["step"] for r in rows] == [1, 2, 3, 4]
    names = {"reward", "reward_std", "kl", "ppo/loss/policy", "ppo/loss/value", "ppo/policy/clipfrac",
             "ppo/val/clipfrac", "completions/mean_length"}
    assert names <= set(rows[0]) and all(r["grad_norm"] > 0 for r in rows)
    assert abs(rows[0]["kl"]) < 1e-5 < rows[-1]["kl"]  # sampler vs teacher-forced forward: ~1e-8 at step 1
    assert "task_accuracy/final" in summary


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_policy_gradient_runlocal(tmp_path, name):
    arg = "runlocal,iterations=2" if name == "rloo" else "runlocal"
    c = entry.load_config_file(f"experiments/{name}.py:{arg}")
    c.online.num_test = 8
    summary = entry.run(c, str(tmp_path))
    rows = _rows(str(tmp_path))
    assert len(rows) == c.train.num_steps and TRL_NAMES <= set(rows[0])
    assert ("kl" in rows[0]) == (name == "rloo")  # rloo's default beta 0.05; grpo's 0 (TRL's defaults)
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert all(1 <= r["completions/mean_length"] <= c.online.max_new_tokens for r in rows)
    assert os.path.exists(tmp_path / "sft" / "metrics.jsonl")  # the SFT stage ran first
    assert "task_accuracy/initial" in summary


def test_online_dpo_runlocal_and_rerun(tmp_path):
    c = entry.load_config_file("experiments/online_dpo.py:runlocal,generations=8")
    c.online.num_test = 8
    c.online.sft_steps = 0
    c.online.reward = "flr"
    c.online.follow_ups = "1"
    first = entry.run(c, str(tmp_path))
    assert len(first["num_pairs/rounds"]) == c.online.rounds
    with open(tmp_path / "round_0" / "pairs.jsonl") as f:
        pairs = [json.loads(line) for line in f]
    assert len(pairs) == first["num_pairs/rounds"][0] > 0
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    train_rows = _rows(str(tmp_path / "round_0" / "train"))
    assert len(train_rows) == 3 and "rewards/margins" in train_rows[0]
    before = _rows(str(tmp_path / "round_1" / "train"))
    again = entry.run(c, str(tmp_path))  # everything reused or restored: the same result
    assert again["task_accuracy/rounds"] == first["task_accuracy/rounds"]
    assert _rows(str(tmp_path / "round_1" / "train")) == before and len(before) == 3


def test_build_pairs():
    prompts = ["p"] * 4 + ["q"] * 4
    comps = ["a", "b", "c", "d", "e", "f", "g", "h"]
    r = np.array([0.0, 2.0, 1.0, np.nan, 1.0, 1.0, 1.0, 1.0])
    assert online.build_pairs(prompts, comps, r, 4) == [{"prompt": "p", "chosen": "b", "rejected": "a"}]
    all_pairs = online.build_pairs(prompts, comps, r, 4, "all")
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in all_pairs] == [
        ("b", "a", 2.0), ("b", "c", 1.0), ("c", "a", 1.0)]
    with pytest.raises(ValueError, match="config.online.pairs='top'"):
        online.build_pairs(prompts, comps, r, 4, "top")


def test_round_pairs_reward_augmented():
    """The online job's relabelling of verifier-scored pairs: each pair twice, conditioned on 1 and 0."""
    from alignjax.online.relabel import relabel

    r = np.array([1.0, 0.0, 0.0, 0.0])
    pairs = online.build_pairs(["12+34="] * 4, ["64", "65", "66", "67"], r, 4, scores=True)
    assert pairs == [{"prompt": "12+34=", "chosen": "64", "rejected": "65", "score_chosen": 1.0,
                      "score_rejected": 0.0}]
    assert relabel(pairs, prefix="{score}+") == [
        {"prompt": "1+12+34=", "chosen": "64", "rejected": "65"},
        {"prompt": "0+12+34=", "chosen": "65", "rejected": "64"}]


def test_config_errors_name_the_key(tmp_path):
    c = entry.load_config_file("experiments/grpo.py:runlocal")
    c.loss.name = "sigmoid"
    with pytest.raises(ValueError, match="config.loss.name='sigmoid'"):
        entry.run(c, str(tmp_path / "a"))
    c = entry.load_config_file("experiments/grpo.py:runlocal")
    c.online.scale_rewards = "global"
    with pytest.raises(ValueError, match="config.online.scale_rewards='global'"):
        entry.run(c, str(tmp_path / "b"))
    c = entry.load_config_file("experiments/grpo.py:runlocal")
    c.online.reward = "oracle"
    with pytest.raises(ValueError, match="config.online.reward='oracle'"):
        online.make_reward_source(c)
