"""The online-vs-offline reproduction (docs/reproductions.md) at its quick size through ``alignjax.main``:
every cell runs, all arms start from one SFT run and report its accuracy, every arm takes the matched
number of policy updates, and the reward model's held-out accuracy equals the exported classifier's
under transformers."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from alignjax import main as entry
from alignjax.data import synthetic
from alignjax.data.pipeline import resolve_tokenizer
from alignjax.repro import common, online_vs_offline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hf_accuracy(export_dir: str, num_pairs: int) -> float:
    """The exported reward model as transformers' classifier on the first held-out pairs: the share
    scoring prompt + chosen above prompt + rejected (both with the tokenizer's EOS, as the data layer
    tokenizes them)."""
    tok = resolve_tokenizer("arithmetic")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        export_dir, dtype=torch.float32
    ).eval()
    rows = synthetic.records("arithmetic_dpo", "val")[:num_pairs]

    def score(prompt, answer):
        ids = list(tok.encode(prompt)) + list(tok.encode(answer)) + [int(tok.eos_id)]
        with torch.no_grad():
            return float(hf(input_ids=torch.tensor([ids])).logits[0, 0])

    return float(np.mean([score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]) for r in rows]))


def test_online_vs_offline_quick_end_to_end(tmp_path):
    cfg = entry.load_config_file(os.path.join(ROOT, "experiments", "repro_online.py") + ":quick")
    out = entry.run(cfg, str(tmp_path))
    c = cfg.repro  # the reproduction's parameters
    saved = json.loads((tmp_path / "table.json").read_text())
    seed = saved["seeds"]["0"]
    want = {
        "offline_dpo/labels",
        *(f"{a}/{r}" for a in ("online_dpo", "grpo", "ppo") for r in ("verifier", "reward_model_4")),
    }
    assert set(seed["cells"]) == want == {f"{a}/{r}" for a, r in online_vs_offline.cells(c)}
    sft = seed["sft"]["task_accuracy"]
    for key, cell in seed["cells"].items():
        for k in ("task_accuracy/initial", "task_accuracy/final"):
            assert np.isfinite(cell[k]) and 0.0 <= cell[k] <= 1.0, (key, k)
        # every arm started from the one SFT run: its held-out accuracy is the SFT row's
        assert cell["task_accuracy/initial"] == sft, key
    # one SFT run, reused (each arm's own workdir has none)
    assert len(common.read_metrics(str(tmp_path / "seed0" / "sft"))) == c.sft_steps
    assert not any(
        (tmp_path / "seed0" / d / "sft").exists()
        for d in os.listdir(tmp_path / "seed0")
        if d not in ("sft", "rm_4")
    )
    # matched policy updates: every arm took config.repro.updates optimiser steps
    d = tmp_path / "seed0"
    for arm in (
        "offline_dpo_labels",
        "grpo_verifier",
        "grpo_reward_model_4",
        "ppo_verifier",
        "ppo_reward_model_4",
    ):
        assert len(common.read_metrics(str(d / arm))) == c.updates, arm
    for arm in ("online_dpo_verifier", "online_dpo_reward_model_4"):
        steps = sum(
            len(common.read_metrics(str(d / arm / f"round_{k}" / "train")))
            for k in range(c.rounds)
            if (d / arm / f"round_{k}" / "train").exists()
        )
        trained = [
            json.loads((d / arm / f"round_{k}" / "done.json").read_text())["trained"] for k in range(c.rounds)
        ]
        assert steps == sum(trained) * c.updates // c.rounds, arm
    assert json.loads((d / "online_dpo_reward_model_4" / "round_0" / "done.json").read_text())["trained"]
    # the reward model's quality as reported equals the exported classifier's under transformers
    rm = seed["rm"]["reward_model_4"]
    assert rm["held_out_pair_accuracy"] == pytest.approx(_hf_accuracy(str(d / "rm_4" / "hf"), c.rm_num_eval))
    table = (tmp_path / "table.md").read_text()
    assert "| grpo | reward model (4 steps) |" in table and "held-out pair accuracy" in table
    assert out["markdown"].strip() == table.strip()
