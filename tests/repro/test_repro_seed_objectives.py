"""The WPO, SparsePO, Sem-DPO and Secrets-II reproductions (docs/reproductions.md): their quick tables
equal a direct recomputation, their inputs equal independent computations (WPO's weight as the
official code computes it, cosine distances in NumPy), the losses' reduction identities hold through
training, and the direction each table reports holds for one seed at the documented size."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from alignjax.repro import secrets_noise, sem_dpo_drift, sparsepo_tokens, wpo_offpolicy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def config(name, arg=""):
    from alignjax.main import load_config_file

    path = os.path.join(ROOT, "experiments", f"repro_{name}.py")
    return load_config_file(path + (f":{arg}" if arg else ""))


def official_wpo_weight(logits, chosen, rejected):
    """wzhouad/WPO ``get_batch_logps`` (weighting branch) ported to NumPy: per token
    log p(y_t) - log sum_v p_v^2, averaged over the tokens, exp of the sum over the pair, clamped at 1."""

    def aligned(y):
        z = logits.astype(np.float64)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        per_token = np.take_along_axis(logp, y[..., None], -1)[..., 0]
        log_sum_sq = np.log(np.exp(2 * logp).sum(-1))
        return (per_token - log_sum_sq).mean(-1)

    return np.minimum(1.0, np.exp(aligned(chosen) + aligned(rejected)))


def test_wpo_quick_table_and_official_weights(tmp_path):
    cfg = config("wpo_offpolicy", "quick")
    c = cfg.repro  # the reproduction's parameters
    out = wpo_offpolicy.run(cfg, str(tmp_path))
    saved = json.loads((tmp_path / "table.json").read_text())
    key = f"misspecified/0.9/{c.beta:g}/wpo"
    task = wpo_offpolicy.make_task(
        0,
        num_prompts=c.num_prompts,
        length=c.length,
        vocab=c.vocab,
        features=c.features,
        pairs_per_prompt=c.pairs_per_prompt,
        off_policy=0.9,
        ref_scale=c.ref_scale,
        reward="misspecified",
    )
    logits = wpo_offpolicy.train(task, "wpo", beta=c.beta, steps=c.steps, lr=c.learning_rate)
    gain = np.mean(
        wpo_offpolicy.expected_reward(logits, task["rewards"])
        - wpo_offpolicy.expected_reward(task["ref"], task["rewards"])
    )
    assert saved["rows"][key]["0"]["reward_gain"] == pytest.approx(gain, rel=1e-5)
    assert out["rows"][key][0]["reward_gain"] == pytest.approx(gain, rel=1e-5)
    # Expected reward by enumeration over all V^T responses of one prompt (T = 4, V = 16 here).
    p = np.asarray(jax.nn.softmax(logits[0], -1), np.float64)  # [T, V]
    grids = np.stack(np.meshgrid(*[np.arange(c.vocab)] * c.length, indexing="ij"), -1).reshape(-1, c.length)
    prob = np.prod(p[np.arange(c.length), grids], -1)
    assert np.sum(prob * task["rewards"][0][grids].sum(-1)) == pytest.approx(
        wpo_offpolicy.expected_reward(logits, task["rewards"])[0], rel=1e-4
    )
    # The pair weights equal the official computation; off-policy pairs weigh far less.
    ref_logits = task["ref"][task["prompt"]]
    want = official_wpo_weight(ref_logits, task["chosen"], task["rejected"])
    np.testing.assert_allclose(wpo_offpolicy.pair_weights(task), want, rtol=1e-4, atol=1e-9)
    assert want[~task["off"]].mean() > 100 * want[task["off"]].mean()


def test_wpo_beats_dpo_on_misspecified_off_policy_pairs():
    """One seed of the documented table (50% off-policy, misspecified reward): WPO's gain > DPO's; with
    the linear (transferable) reward, DPO's gain > WPO's, as the table reports."""
    cfg = config("wpo_offpolicy")
    c = cfg.repro  # the reproduction's parameters
    kw = dict(
        num_prompts=c.num_prompts,
        length=c.length,
        vocab=c.vocab,
        features=c.features,
        pairs_per_prompt=c.pairs_per_prompt,
        off_policy=0.5,
        ref_scale=c.ref_scale,
    )
    gain = {}
    for reward in ("misspecified", "linear"):
        task = wpo_offpolicy.make_task(0, reward=reward, **kw)
        base = wpo_offpolicy.expected_reward(task["ref"], task["rewards"])
        for m in ("dpo", "wpo"):
            logits = wpo_offpolicy.train(task, m, beta=c.beta, steps=c.steps, lr=c.learning_rate)
            gain[reward, m] = np.mean(wpo_offpolicy.expected_reward(logits, task["rewards"]) - base)
    assert gain["misspecified", "wpo"] > gain["misspecified", "dpo"] + 0.2
    assert gain["linear", "dpo"] > gain["linear", "wpo"]


def test_sparsepo_quick_table_and_mask_effects(tmp_path):
    cfg = config("sparsepo_tokens", "quick")
    c = cfg.repro  # the reproduction's parameters
    out = sparsepo_tokens.run(cfg, str(tmp_path))
    saved = json.loads((tmp_path / "table.json").read_text())
    task = sparsepo_tokens.make_task(
        0,
        num_prompts=c.num_prompts,
        length=c.length,
        vocab=c.vocab,
        signal_positions=c.signal_positions,
        pairs_per_prompt=c.pairs_per_prompt,
        ref_scale=c.ref_scale,
    )
    assert (task["rewards"][:, c.signal_positions :] == 0).all()
    logits, mask = sparsepo_tokens.train(task, "dpo", beta=c.beta, steps=c.steps, lr=c.learning_rate, l1=0.0)
    kl = sparsepo_tokens.position_kl(logits, task["ref"])
    assert saved["rows"]["dpo"]["0"]["kl_filler"] == pytest.approx(
        kl[:, c.signal_positions :].sum(-1).mean(), rel=1e-5
    )
    # KL per position against scipy's entropy(p, q).
    from scipy.stats import entropy

    p, q = jax.nn.softmax(logits[0, 3]), jax.nn.softmax(task["ref"][0, 3])
    assert kl[0, 3] == pytest.approx(entropy(np.asarray(p, np.float64), np.asarray(q, np.float64)), rel=1e-3)
    # The oracle mask zeroes the filler's gradient: those positions never leave the reference.
    oracle = out["rows"]["sparsepo_oracle"][0]
    assert oracle["kl_filler"] == 0.0 and oracle["kl_signal"] > 0


def test_sparsepo_learned_mask_moves_filler_less_than_dpo():
    """One seed at the documented size: the learned mask (l1 = 0.03) ends near 1 on the reward
    positions and near 0 on the filler, with a larger reward gain and less filler KL than DPO."""
    cfg = config("sparsepo_tokens")
    c = cfg.repro  # the reproduction's parameters
    task = sparsepo_tokens.make_task(
        0,
        num_prompts=c.num_prompts,
        length=c.length,
        vocab=c.vocab,
        signal_positions=c.signal_positions,
        pairs_per_prompt=c.pairs_per_prompt,
        ref_scale=c.ref_scale,
    )
    base = sparsepo_tokens.expected_reward(task["ref"], task["rewards"])
    res = {}
    for m, l1 in (("dpo", 0.0), ("sparsepo_learned", 0.03)):
        logits, mask = sparsepo_tokens.train(task, m, beta=c.beta, steps=c.steps, lr=c.learning_rate, l1=l1)
        kl = sparsepo_tokens.position_kl(logits, task["ref"])
        res[m] = (
            np.mean(sparsepo_tokens.expected_reward(logits, task["rewards"]) - base),
            kl[:, ~task["signal"]].sum(-1).mean(),
            mask,
        )
    assert res["sparsepo_learned"][0] > res["dpo"][0]
    assert res["sparsepo_learned"][1] < 0.5 * res["dpo"][1]
    mask = res["sparsepo_learned"][2]
    assert mask[task["signal"]].mean() > 0.8 and mask[~task["signal"]].mean() < 0.2


def test_sem_dpo_quick_table_distances_and_identity(tmp_path):
    cfg = config("sem_dpo_drift", "quick")
    c = cfg.repro  # the reproduction's parameters
    out = sem_dpo_drift.run(cfg, str(tmp_path))
    saved = json.loads((tmp_path / "table.json").read_text())
    kw = dict(
        num_prompts=c.num_prompts,
        num_responses=c.num_responses,
        pairs_per_prompt=c.pairs_per_prompt,
        embed_dim=c.embed_dim,
        embed_noise=c.embed_noise,
        drift_share=c.drift_share,
        drift_bonus=c.drift_bonus,
    )
    task = sem_dpo_drift.make_task(0, **kw)
    a, b = task["topics"][task["prompt"]], task["embeddings"][task["prompt"], task["chosen"]]
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(task["semantic_distance"], 1 - cos, rtol=1e-5, atol=1e-6)
    logits = sem_dpo_drift.train(task, "sem_dpo", beta=c.beta, alpha=1.0, steps=c.steps, lr=c.learning_rate)
    row = sem_dpo_drift.policy_row(logits, task)
    assert saved["rows"]["sem_dpo alpha=1"]["0"]["drifted_share"] == pytest.approx(row["drifted_share"])
    assert out["rows"]["reference"][0]["drifted_share"] == pytest.approx(task["drifted"].mean())
    # sem_alpha = 0 is DPO (W = 1), step for step.
    fit = {
        m: sem_dpo_drift.train(task, m, beta=c.beta, alpha=0.0, steps=c.steps, lr=c.learning_rate)
        for m in ("sem_dpo", "dpo")
    }
    np.testing.assert_allclose(fit["sem_dpo"], fit["dpo"], atol=1e-6)


def test_sem_dpo_drifts_less_than_dpo():
    """One seed at the documented size: DPO raises the drifted share above the reference's, Sem-DPO
    (alpha 5) keeps it lower than DPO and keeps most of DPO's quality gain."""
    cfg = config("sem_dpo_drift")
    c = cfg.repro  # the reproduction's parameters
    task = sem_dpo_drift.make_task(
        0,
        num_prompts=c.num_prompts,
        num_responses=c.num_responses,
        pairs_per_prompt=c.pairs_per_prompt,
        embed_dim=c.embed_dim,
        embed_noise=c.embed_noise,
        drift_share=c.drift_share,
        drift_bonus=c.drift_bonus,
    )
    rows = {}
    for m in ("dpo", "sem_dpo"):
        logits = sem_dpo_drift.train(task, m, beta=c.beta, alpha=5.0, steps=c.steps, lr=c.learning_rate)
        rows[m] = sem_dpo_drift.policy_row(logits, task)
    assert rows["dpo"]["drifted_share"] > task["drifted"].mean() + 0.1
    assert rows["sem_dpo"]["drifted_share"] < rows["dpo"]["drifted_share"] - 0.1
    assert rows["sem_dpo"]["quality"] > 0.8 * rows["dpo"]["quality"]


def test_secrets_noise_quick_table_is_consistent(tmp_path):
    """The quick table's counts equal the pipeline's files (accuracy direction: the reward tests)."""
    cfg = config("secrets_noise", "quick")
    c = cfg.repro  # the reproduction's parameters
    out = secrets_noise.run(cfg, str(tmp_path))
    cell = out["rows"]["0.30"][0]
    d = tmp_path / "noise0.30" / "seed0"
    strength = [json.loads(line) for line in open(d / "secrets" / "strength.jsonl")]
    info = json.loads((d / "secrets" / "strength.json").read_text())
    assert len(strength) == c.num_train
    assert cell["flipped"] == info["secrets/flipped"]
    rows = [json.loads(line) for line in open(d / "train.jsonl")]
    assert [r["chosen"] for r in rows] == [r["chosen"] for r in strength]  # the same pairs, in order
    for k in ("plain_accuracy", "secrets_accuracy", "ceiling", "wrong_label_share"):
        assert 0.0 <= cell[k] <= 1.0
    assert "Secrets-II: held-out acc." in (tmp_path / "table.md").read_text()
