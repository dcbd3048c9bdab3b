"""alignjax.main: config validation before any compute."""

import os
import subprocess
import sys

import pytest

from alignjax import main as entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_override_names_key_and_valid_keys():
    with pytest.raises(SystemExit) as err:
        entry.check_overrides(["prog", "--config=experiments/dpo.py:runlocal", "--config.loss.bta=3"])
    msg = str(err.value)
    assert "unknown config key 'loss.bta'" in msg and "loss.beta" in msg and "optim.learning_rate" in msg
    entry.check_overrides(["prog", "--config=experiments/dpo.py:runlocal", "--config.loss.beta=3"])  # valid


def test_validate_rejects_bad_loss_model_and_job():
    c = entry.load_config_file("experiments/dpo.py:runlocal")
    c.loss.name = "nope"
    with pytest.raises(KeyError, match="registered losses"):
        entry.validate(c)
    c = entry.load_config_file("experiments/dpo.py:runlocal")
    c.model.path = "giant"
    with pytest.raises(
        ValueError, match=r"config.model.path='giant' is neither a directory nor a model preset.*tiny"
    ):
        entry.validate(c)
    c = entry.load_config_file("experiments/dpo.py:runlocal")
    c.job = "fly"
    with pytest.raises(ValueError, match=r"config.job='fly'; valid jobs"):
        entry.validate(c)


def test_command_line_fails_fast_on_unknown_key(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignjax.main",
            "--config=experiments/dpo.py:runlocal",
            f"--workdir={tmp_path}",
            "--config.optim.lerning_rate=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown config key 'optim.lerning_rate'" in proc.stderr
    assert not os.path.exists(tmp_path / "config.json")  # nothing ran
