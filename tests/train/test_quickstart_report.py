"""What a reader of the quickstart sees: the objective it ran named as the step trains it, rounded
figures, and a plot of task accuracy before/after by carry class, the training loss and the
evaluation curve (drawn from the rows given, checked on the figure's own artists)."""

from __future__ import annotations

import re

import pytest

from alignjax.jobs import quickstart as job
from alignjax.train import pipeline
from alignjax.train.step import make_step_spec
from experiments import quickstart


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("", "RPO (DPO + NLL), beta 2, NLL weight 1"),
        ("rpo=false", "DPO, beta 5"),
        ("rpo=false,loss=ipo", "ipo, beta 5"),
        ("loss=ipo", "ipo + NLL, beta 2, NLL weight 1"),
        ("loss=cpo", "cpo, beta 2, NLL weight 1"),  # CPO's own NLL weight: no term added by the trainer
    ],
)
def test_objective_name_is_what_the_step_trains(arg, expected):
    config = quickstart.get_config(arg)
    name = job.objective_name(config.dpo.loss)
    assert name == expected
    spec = make_step_spec(pipeline.stage_config(config, "dpo"), 8, "model")
    # "+ NLL" / "RPO" exactly when the step adds its own NLL term to the loss.
    assert ("+ NLL" in name) == (spec.nll_weight > 0)
    assert not name.startswith("DPO") or spec.nll_weight == 0


SUMMARY = {
    "objective": "RPO (DPO + NLL), beta 2, NLL weight 1",
    "steps/sft": 2500,
    "steps/dpo": 300,
    "num_test_prompts": 2000,
    "num_val_prompts": 500,
    "task_accuracy/sft": 0.547123456,
    "task_accuracy/dpo": 0.998012345,
    "task_accuracy/gain_points": 45.0888888,
    "task_accuracy/carry=True/sft": 0.0941234,
    "task_accuracy/carry=True/dpo": 0.9967,
    "task_accuracy/carry=False/sft": 1.0,
    "task_accuracy/carry=False/dpo": 0.99999,
    "task_accuracy/val_sft": 0.55,
    "task_accuracy/val_dpo": 0.998,
    "pair_accuracy/sft": 0.55000001,
    "pair_accuracy/dpo": 0.99800002,
    "wall_s/total": 90.444,
}


def test_headline_names_the_objective_with_rounded_figures():
    text = job.headline(SUMMARY)
    first = text.splitlines()[0]
    assert first == "quickstart: RPO (DPO + NLL), beta 2, NLL weight 1; 300 steps after 2500 SFT steps"
    assert (
        "SFT 0.547 -> RPO (DPO + NLL) 0.998 (+45.1 points); carry 0.094 -> 0.997, no carry 1.000 -> 1.000"
        in text
    )
    assert "validation task accuracy (500 prompts): 0.550 -> 0.998" in text
    assert "pair ranking accuracy (validation pairs): 0.550 -> 0.998" in text
    assert "wall time 90 s" in text
    assert not re.search(r"\d\.\d{4,}", text), text  # nothing unrounded


def test_figure_shows_task_accuracy_by_carry_loss_and_evaluation(tmp_path):
    train = [{"step": s, "loss": 2.0 - 0.1 * s, "loss/objective": 0.7 - 0.05 * s} for s in range(1, 7)]
    evals = [
        {
            "step": s,
            "eval/ranking_accuracy": 0.5 + 0.1 * s,
            "eval/reward_accuracy": 0.4 + 0.1 * s,
            "eval/ref_ranking_accuracy": 0.55,
            "eval/nll_chosen": 1.0 / s,
        }
        for s in (2, 4, 6)
    ]
    rows = train[:2] + [evals[0]] + train[2:4] + [evals[1]] + train[4:] + [evals[2]]
    before = {"accuracy": 0.55, "accuracy/carry=False": 1.0, "accuracy/carry=True": 0.09}
    after = {"accuracy": 0.99, "accuracy/carry=False": 0.995, "accuracy/carry=True": 0.985}
    fig = job.quickstart_figure(rows, before, after, "RPO (DPO + NLL)", num_prompts=2000)
    task, loss, ev, nll = fig.axes

    heights = [round(p.get_height(), 6) for p in task.patches]
    assert heights == [0.55, 0.09, 1.0, 0.99, 0.985, 0.995]  # SFT then after: all, carry, no carry
    assert [t.get_text() for t in task.get_xticklabels()] == ["all", "carry", "no carry"]
    assert [t.get_text() for t in task.get_legend().get_texts()] == ["SFT", "RPO (DPO + NLL)"]
    assert "2000 held-out prompts" in task.get_title()

    assert loss.get_title() == "training loss: RPO (DPO + NLL)"
    total, term = loss.get_lines()
    assert list(total.get_xdata()) == list(range(1, 7))
    assert list(total.get_ydata()) == [r["loss"] for r in train]
    assert list(term.get_ydata()) == [r["loss/objective"] for r in train]

    ranking, reward, reference = ev.get_lines()
    assert list(ranking.get_xdata()) == [2, 4, 6]
    assert list(ranking.get_ydata()) == [r["eval/ranking_accuracy"] for r in evals]
    assert list(reward.get_ydata()) == [r["eval/reward_accuracy"] for r in evals]
    assert list(reference.get_ydata()) == [0.55, 0.55]
    assert list(nll.get_lines()[0].get_ydata()) == [r["eval/nll_chosen"] for r in evals]

    job.save_figure(fig, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
