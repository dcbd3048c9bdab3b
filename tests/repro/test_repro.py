"""Reproduction pipelines on tiny configs: the table rows equal a direct recomputation from the saved
arrays, and the row functions equal NumPy formulas. (Full runs are for docs/reproductions.md.)"""

import json
import os
import sys

import numpy as np
import pytest

from alignjax.repro import adpo_noise, common, diffusion2d, ranking, three_d

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def config(name, arg="quick"):
    from alignjax.main import load_config_file

    return load_config_file(os.path.join(ROOT, "experiments", f"repro_{name}.py") + f":{arg}")


def test_ranking_row_matches_numpy():
    rng = np.random.default_rng(0)
    a = {
        k: rng.normal(-8, 2, 200).astype(np.float32)
        for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    }
    row = ranking.pair_row(a, beta=0.5)
    ranked = a["chosen_logps"] >= a["rejected_logps"]
    mis = a["ref_chosen_logps"] < a["ref_rejected_logps"]
    assert row["ranking_accuracy"] == pytest.approx(ranked.mean())
    assert row["flipped_fraction"] == pytest.approx((mis & ranked).sum() / mis.sum())
    margin = (a["ref_chosen_logps"] - a["ref_rejected_logps"]) + np.log(0.999 / 0.001) / 0.5
    assert row["idealized_ranking_accuracy"] == pytest.approx((margin > 0).mean())
    assert row["theorem_4_1_agreement"] == 1.0  # the identity is exact


def test_three_d_row_matches_numpy():
    rng = np.random.default_rng(1)
    pol = {
        "chosen_logps": rng.normal(-5, 1, 50),
        "rejected_logps": rng.normal(-6, 1, 50),
        "chosen_lengths": rng.integers(1, 5, 50),
        "rejected_lengths": rng.integers(1, 5, 50),
    }
    ref = {"chosen_logps": rng.normal(-5, 1, 50), "rejected_logps": rng.normal(-5, 1, 50)}
    row = three_d.likelihood_row(pol, ref)
    assert row["delta_rejected"] == pytest.approx(
        np.mean((pol["rejected_logps"] - ref["rejected_logps"]) / pol["rejected_lengths"])
    )
    assert row["delta_chosen"] == pytest.approx(
        np.mean((pol["chosen_logps"] - ref["chosen_logps"]) / pol["chosen_lengths"])
    )


def test_adpo_noise_quick_table_is_consistent(tmp_path):
    cfg = config("adpo_noise")
    c = cfg.repro  # the reproduction's parameters
    out = adpo_noise.run(cfg, str(tmp_path))
    saved = json.loads((tmp_path / "table.json").read_text())
    assert set(saved["rows"]) == {"0.0", "0.4"}
    # Recompute one cell directly: the same task and training give the same number.
    task = adpo_noise.make_task(
        0, c.num_prompts, c.num_responses, c.pairs_per_prompt, 0.4, c.score_noise, c.temperature
    )
    assert 0.2 < task["flipped"].mean() < 0.6
    logits = adpo_noise.train(
        task, "dpo", beta=c.beta, steps=c.steps, lr=c.learning_rate, anchor_every=c.anchor_every
    )
    acc = adpo_noise.true_ranking_accuracy(logits, task["rewards"])
    assert out["rows"]["0.4"]["dpo"][0]["ranking_accuracy"] == pytest.approx(acc)
    assert saved["rows"]["0.4"]["dpo"]["0"]["ranking_accuracy"] == pytest.approx(acc)
    # The true-ranking metric against a brute-force count.
    r = task["rewards"]
    want = np.mean(
        [
            np.sign(logits[p, i] - logits[p, j]) == np.sign(r[p, i] - r[p, j])
            for p in range(r.shape[0])
            for i in range(r.shape[1])
            for j in range(i + 1, r.shape[1])
        ]
    )
    assert acc == pytest.approx(want)
    assert common.fmt([0.5, 0.7]) == "0.600 ± 0.141"


def test_diffusion2d_quick_table_is_consistent(tmp_path):
    out = diffusion2d.run(config("diffusion2d"), str(tmp_path))
    row = out["rows"][0]
    assert row["first_loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at step 1
    x = np.array([[1.0, 0.0], [-2.0, 0.1], [5.0, 5.0], [0.5, 0.0]], np.float32)
    stats = diffusion2d.sample_stats(x)
    assert stats == {"preferred_share": 0.75, "near_mode_share": 0.5}  # (0.5, 0) is 3 std from (2, 0)
    w, lo = diffusion2d.make_pairs(x, 10)
    assert (w[:, 0] > 0).all() and (lo[:, 0] <= 0).all() and len(w) == 1
    assert "dpo_preferred_share" in (tmp_path / "table.md").read_text()


REPRO_FILES = (
    "ranking",
    "3d",
    "adpo_noise",
    "diffusion2d",
    "wpo_offpolicy",
    "sparsepo_tokens",
    "sem_dpo_drift",
    "secrets_noise",
    "online",
)


@pytest.mark.parametrize("name", REPRO_FILES)
def test_repro_configs_are_the_base_config_with_the_reproductions_parameters(name):
    """Each experiments/repro_*.py is configs.base_config() (the shared keys mean what they mean
    everywhere) with config.repro, whose keys are exactly the reproduction's declared parameters."""
    from alignjax.configs import base_config
    from alignjax.repro import params

    for arg in ("", "quick"):
        c = config(name, arg)
        assert c.job in params.PARAMS
        assert set(c.to_dict()) - {"repro"} == set(base_config().to_dict())
        assert set(c.repro) == set(params.PARAMS[c.job])
        assert common.repro_params(c, c.job).to_dict() == c.repro.to_dict()


def test_an_unknown_repro_parameter_fails_in_one_line_naming_it(tmp_path):
    c = config("ranking")
    c.repro.sft_stps = 3
    with pytest.raises(ValueError) as e:
        ranking.run(c, str(tmp_path))
    want = "config.repro.sft_stps: not a parameter of repro_ranking; valid: batch_size, beta, learning_rate,"
    assert str(e.value).startswith(want)
    assert "\n" not in str(e.value)
    assert not os.listdir(tmp_path)  # refused before any run
