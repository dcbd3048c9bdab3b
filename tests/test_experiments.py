"""Experiment configs: typed string arguments, loss hyperparameters from the registry, runlocal; an
experiment file runs from anywhere on disk."""

import importlib
import os
import shutil
import subprocess
import sys

import pytest

import alignjax.losses as losses
from alignjax import configs as common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_an_experiment_file_outside_the_repository_runs_from_another_directory(tmp_path):
    """Copies of experiments/dpo.py and of rloo.py with the grpo.py it builds on, in a directory of
    their own, load from a third directory in a fresh interpreter that cannot import ``experiments``;
    and the entry point, started there, reads the copy through config_flags and reaches the config's
    own checks (a bad value, caught after the file loaded: exit 2 naming the key)."""
    mine, elsewhere = tmp_path / "my_configs", tmp_path / "elsewhere"
    mine.mkdir(), elsewhere.mkdir()
    for name, copy in (("dpo", "my_dpo"), ("rloo", "my_rloo"), ("grpo", "grpo")):  # rloo finds grpo by name
        shutil.copy(os.path.join(REPO, "experiments", f"{name}.py"), mine / f"{copy}.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('experiments') is None, sys.path\n"
        "from alignjax.configs import load_config_file\n"
        f"c = load_config_file({str(mine / 'my_dpo.py')!r} + ':runlocal,loss=ipo')\n"
        f"r = load_config_file({str(mine / 'my_rloo.py')!r} + ':runlocal')\n"
        "print(c.loss.name, c.train.num_steps, r.job, r.online.num_generations)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ipo", "10", "rloo", "4"]
    assert (
        common.load_config_file(f"{mine / 'my_dpo.py'}:runlocal,loss=ipo").to_dict()
        == _config("dpo", "runlocal,loss=ipo").to_dict()
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignjax.main",
            f"--config={mine / 'my_dpo.py'}:runlocal",
            f"--workdir={tmp_path / 'wd'}",
            "--config.train.log_every=0",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: config.train.log_every=0: must be >= 1 (steps between logged metrics)"
    ]
