"""One stage config for every staged job (alignjax.train.pipeline.stage_config): a stage keeps the
job loss's hyperparameters when it trains that loss, drops them when it trains another, and carries no
job section."""

import os

from alignjax.configs import load_config_file
from alignjax.train.pipeline import JOB_SECTIONS, stage_config

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
