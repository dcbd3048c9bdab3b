"""Experiment configs: typed string arguments, loss hyperparameters from the registry, runlocal."""

import importlib

import pytest

import alignjax.losses as losses
from experiments import common


def _config(name, arg=None):
    return importlib.import_module(f"experiments.{name}").get_config(arg)


def test_parse_arg_types_and_flags():
    a = common.parse_arg("steps=7,lr=0.5,model=x,runlocal", steps=0, lr=1.0, model="tiny", runlocal=False)
    assert (a.steps, a.lr, a.model, a.runlocal) == (7, 0.5, "x", True)
    assert isinstance(a.steps, int) and isinstance(a.lr, float)
    with pytest.raises(ValueError, match=r"unknown config argument 'nope'.*valid arguments: \['runlocal'\]"):
        common.parse_arg("nope=1", runlocal=False)
    with pytest.raises(ValueError, match="needs a value"):
        common.parse_arg("steps", steps=0)


@pytest.mark.parametrize("loss", ["ipo", "sigmoid", "hinge"])
def test_dpo_config_takes_the_loss_hyperparameters(loss):
    c = _config("dpo", f"loss={loss},runlocal,steps=3")
    spec = losses.spec(loss)
    assert c.loss.name == loss
    for key, default in spec.hyperparameters.items():
        if default is not None:
            assert c.loss[key] == default
    assert c.train.num_steps == 3 and c.model.path == "tiny" and c.data.batch_size == 8
    assert dict(c.mesh) == {"data": -1, "fsdp": 1, "tensor": 1}


def test_unknown_loss_lists_registered_names():
    with pytest.raises(KeyError, match="unknown loss 'dpo_typo'; registered losses: .*sigmoid"):
        _config("dpo", "loss=dpo_typo")


def test_every_config_and_its_runlocal_variant():
    for name, job in [
        ("dpo", "train"),
        ("sft", "train"),
        ("kto", "train"),
        ("score", "score"),
        ("quickstart", "quickstart"),
    ]:
        full, local = _config(name), _config(name, "runlocal")
        assert full.job == local.job == job
        assert set(common.base_config().keys()) <= set(full.keys())
    assert _config("sft").loss.name == "sft" and _config("sft").reference.kind == "none"
    assert _config("score", "mode=norm,reference=tiny").score.mode == "norm"
    with pytest.raises(ValueError, match="mode='bad'"):
        _config("score", "mode=bad")
    q = _config("quickstart", "rpo=true")
    assert (q.dpo.loss.nll_weight, q.dpo.loss.beta, q.dpo.optim.learning_rate) == (1.0, 2.0, 4e-4)
    q = _config("quickstart", "rpo=false")
    assert (q.dpo.loss.nll_weight, q.dpo.loss.beta, q.dpo.optim.learning_rate) == (0.0, 5.0, 1e-4)
    assert _config("quickstart", "beta=0.5,dpo_lr=1e-4").dpo.loss.beta == 0.5  # the arguments still win
