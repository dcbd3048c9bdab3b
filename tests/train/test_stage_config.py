"""One stage config for every staged job (alignjax.train.pipeline.stage_config): a stage keeps the
job loss's hyperparameters when it trains that loss, drops them when it trains another, and carries no
job section; an override naming no shared key fails in one line naming it."""

import os

import pytest

from alignjax.configs import STAGES, load_config_file
from alignjax.train.pipeline import JOB_SECTIONS, check_stage, stage_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def experiment(name, arg=""):
    path = os.path.join(ROOT, "experiments", f"{name}.py")
    return load_config_file(f"{path}:{arg}" if arg else path)


def test_online_dpo_stage_trains_the_experiments_beta_and_sft_drops_grpos_keys():
    online_dpo = experiment("online_dpo", "beta=2.0,loss=sigmoid")
    dpo = stage_config(online_dpo, "dpo")
    assert (dpo.loss.name, dpo.loss.beta, dpo.loss.nll_weight) == ("sigmoid", 2.0, 1.0)
    assert dpo.optim.learning_rate == online_dpo.dpo.optim["learning_rate"]
    sft = stage_config(experiment("grpo"), "sft")
    assert sft.loss.name == "sft" and "beta" not in sft.loss and "loss_type" not in sft.loss
    for c in (dpo, sft):
        assert c.job == "train" and not any(k in c for k in JOB_SECTIONS)


def test_mcts_dpo_stage_takes_data_keys_and_quickstart_stage_its_own_loss():
    mcts = stage_config(experiment("mcts_dpo", "runlocal"), "dpo", kind="stepwise", source="x.jsonl")
    assert (mcts.data.kind, mcts.data.source, mcts.loss.name) == ("stepwise", "x.jsonl", "mcts_dpo")
    quick = stage_config(experiment("quickstart"), "dpo")
    assert quick.loss.beta == experiment("quickstart").dpo.loss["beta"]


def test_a_stage_override_naming_no_shared_key_fails_naming_it():
    c = experiment("quickstart", "runlocal")
    c.sft.optim.lerning_rate = 1e-3
    with pytest.raises(ValueError) as err:
        stage_config(c, "sft")
    assert str(err.value).splitlines() == [
        "config.sft.optim.lerning_rate: not a key of config.optim (did you mean 'learning_rate'?)"
    ]
    c = experiment("mcts_dpo", "runlocal")
    c.dpo.loss.bta = 0.1  # neither a config.loss key nor a hyperparameter of the stage's mcts_dpo loss
    with pytest.raises(ValueError, match=r"^config\.dpo\.loss\.bta: not a key of config\.loss nor a hyper"):
        stage_config(c, "dpo")
    c = experiment("mcts_dpo", "runlocal")
    c.dpo.mcts_dpo = dict(rounds=1)  # a job section is not a stage's to override
    with pytest.raises(ValueError, match=r"^config\.dpo\.mcts_dpo: not a key of the shared sections"):
        stage_config(c, "dpo")
    with pytest.raises(ValueError, match=r"^stage_config\(data\)\.knd: not a key of config\.data"):
        stage_config(experiment("mcts_dpo", "runlocal"), "dpo", knd="step")


@pytest.mark.parametrize(
    "name,arg",
    [
        ("quickstart", ""),
        ("quickstart", "rpo=false"),
        ("mcts_dpo", ""),
        ("mcts_dpo", "method=instance"),
        ("grpo", "runlocal"),
        ("rloo", ""),
        ("online_dpo", "runlocal"),
        ("ppo", ""),
    ],
)
def test_every_staged_experiments_stages_override_shared_keys(name, arg):
    c = experiment(name, arg)
    for stage in STAGES:
        check_stage(c, stage)
