"""Reproduction: Secrets of RLHF II's label flipping vs a plain Bradley-Terry reward model under injected
preference noise.

Claim ("Secrets of RLHF in Large Language Models Part II: Reward Modeling", Wang et al.,
arXiv:2401.06080): preference strength measured by an ensemble of reward models (mean of
r_m(y_w) - r_m(y_l) over members) finds incorrect labels; flipping the lowest-strength pairs (where the
ensemble disagrees with the label) and retraining gives a better reward model on noisy data.

Task (the setting of ``tests/reward/test_reward.py::test_secrets_flipping_recovers_from_label_noise``):
responses are 4 digits, the true reward is linear in the digits, r(y) = sum_t w[y_t] (w seeded per
seed), labels are sampled from Bradley-Terry on r (:func:`alignjax.reward.synthetic.linear_bt_pairs`),
then a share ``noise`` of them is flipped on top. 256 training pairs, 512 clean held-out pairs (BT-
sampled labels, no injected flips); the ceiling is the true reward's accuracy on them. The reward
model is the tiny decoder (1 layer, width 32) with a value head. Per seed and noise level:
``plain``: Bradley-Terry for ``steps`` steps; ``secrets``: the library's pipeline
(:func:`alignjax.reward.secrets.run_secrets`: 4 independently trained members for ``ensemble_steps``
steps, strength, flip the lowest ``flip_fraction`` where mu < 0, retrain ``secrets_rm`` for ``steps``
steps). The flip fraction is fixed (it does not know the injected rate). Also reported: how many pairs
were flipped and the share of them whose label disagreed with the true reward (against that share
among all training pairs).

    python -m alignjax.main --config=experiments/repro_secrets_noise.py --workdir=workdirs/repro_secrets
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from alignjax import recipes
from alignjax.configs import ConfigDict
from alignjax.repro import common
from alignjax.reward import synthetic as S
from alignjax.reward.evaluate import score_file
from alignjax.reward.secrets import run_secrets
from alignjax.reward.train import train_reward_model
from alignjax.train.result import TrainResult

SMALL = dict(vocab_size=16, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)


def reward_config(objective: str, source: str, p: ConfigDict, seed: int) -> Any:
    """experiments/reward_model.py's runlocal config (:func:`alignjax.recipes.reward_model`) on the tiny
    decoder, constant lr, no evaluation."""
    c = recipes.reward_model(f"objective={objective},runlocal")
    c.seed = seed
    c.model.overrides.update(SMALL)
    c.data.source, c.data.eval_source = source, ""
    c.data.max_length = 12
    c.data.batch_size, c.data.eval_batch_size = p.batch_size, 64
    c.train.num_steps = c.train.checkpoint_every = p.steps
    c.train.progress = c.train.plot = c.train.tensorboard = False
    c.optim.learning_rate, c.optim.warmup_steps, c.optim.schedule = p.learning_rate, 0, "constant"
    if objective == "secrets":
        c.reward.secrets.update(
            ensemble_steps=p.ensemble_steps,
            flip_fraction=p.flip_fraction,
            smooth_fraction=0.0,
            score_batch_size=64,
            ensemble=p.ensemble,
        )
    return c


def run_one(p: ConfigDict, workdir: str, seed: int, noise: float) -> dict[str, float]:
    """One (seed, noise) cell: held-out accuracy of plain BT and of the Secrets-II pipeline."""
    os.makedirs(workdir, exist_ok=True)
    w = S.linear_weights(seed)
    train_rows, train_diffs = S.linear_bt_pairs(p.num_train, weights=w, seed=100 * seed + 1, noise=noise)
    held, held_diffs = S.linear_bt_pairs(p.num_eval, weights=w, seed=100 * seed + 2)
    source = S.write_jsonl(train_rows, os.path.join(workdir, "train.jsonl"))
    held_path = S.write_jsonl(held, os.path.join(workdir, "eval.jsonl"))

    def accuracy(c: Any, result: TrainResult) -> float:
        return float(score_file(c, result.model, result.params, held_path)["accuracy"])

    cp = reward_config("bt", source, p, seed)
    plain = accuracy(cp, train_reward_model(cp, os.path.join(workdir, "plain")))
    cs = reward_config("secrets", source, p, seed)
    result = run_secrets(cs, os.path.join(workdir, "secrets"))
    secrets = accuracy(cs, result)
    with open(os.path.join(workdir, "secrets", "strength.jsonl")) as f:
        mu = np.array([json.loads(line)["margin"] for line in f])
    flipped = mu < min(result.summary["secrets/flip_below"], 0.0)
    wrong = train_diffs < 0  # the label disagrees with the true reward (BT sampling or an injected flip)
    return {
        "plain_accuracy": plain,
        "secrets_accuracy": secrets,
        "ceiling": S.ceiling(held_diffs),
        "flipped": float(flipped.sum()),
        "flipped_wrong_share": float(wrong[flipped].mean()) if flipped.any() else float("nan"),
        "wrong_label_share": float(wrong.mean()),
    }


METRICS = (
    "plain_accuracy",
    "secrets_accuracy",
    "ceiling",
    "flipped",
    "flipped_wrong_share",
    "wrong_label_share",
)


def run(config: Any, workdir: str) -> dict[str, Any]:
    p = common.repro_params(config, "repro_secrets_noise")
    seeds = list(p.seeds)
    rows: dict[str, dict[int, dict[str, float]]] = {}
    for noise in p.noise_levels:
        rows[f"{noise:.2f}"] = {
            s: run_one(p, os.path.join(workdir, f"noise{noise:.2f}", f"seed{s}"), s, noise) for s in seeds
        }
    header = [
        "injected flips",
        "plain BT: held-out acc.",
        "Secrets-II: held-out acc.",
        "ceiling",
        "pairs flipped",
        "flipped pairs whose label was wrong",
        "wrong labels among all pairs",
        "per seed (plain, Secrets-II)",
    ]
    table = []
    for noise, per in rows.items():
        cells = [common.fmt([per[s][k] for s in seeds], 1 if k == "flipped" else 3) for k in METRICS]
        each = "; ".join(f"{per[s]['plain_accuracy']:.3f}, {per[s]['secrets_accuracy']:.3f}" for s in seeds)
        table.append([f"{float(noise):.0%}", *cells, each])
    markdown = common.markdown_table(header, table)
    common.write_table(workdir, {"rows": rows, "config": p.to_dict()}, markdown)
    return {"rows": rows, "markdown": markdown}
