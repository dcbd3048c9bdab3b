"""alignjax.main: config validation before any compute."""

import os
import subprocess
import sys

import pytest

from alignjax import main as entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -m alignjax.main ARGS`` from the repository root, its output captured."""
    command = [sys.executable, "-m", "alignjax.main", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


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
    proc = run_main(
        "--config=experiments/dpo.py:runlocal",
        f"--workdir={tmp_path}",
        "--config.optim.lerning_rate=1",
    )
    assert proc.returncode != 0
    assert "unknown config key 'optim.lerning_rate'" in proc.stderr
    assert not os.path.exists(tmp_path / "config.json")  # nothing ran


DPO = "--config=experiments/dpo.py:runlocal"
BAD_COMMANDS = {
    "no config file": (["--config=experiments/nope.py"], 2, "no such config file 'experiments/nope.py'"),
    "bad config argument": (["--config=experiments/dpo.py:bogus"], 2, "unknown config argument 'bogus'"),
    "unknown flag": ([DPO, "--bogus=1"], 2, "Unknown command line flag 'bogus'"),
    "unknown loss": ([DPO, "--config.loss.name=nope"], 2, "unknown loss 'nope'"),
    "no --config": ([], 2, "--config is required"),
    "loss of another job": (
        ["--config=experiments/dpo.py:runlocal,loss=bradley_terry"],
        2,
        "config.loss.name='bradley_terry': a reward loss, trained by the reward_model job "
        "(experiments/reward_model.py), not by this step",
    ),
    "zero log_every": ([DPO, "--config.train.log_every=0"], 2, "config.train.log_every=0: must be >= 1"),
    "keep no checkpoint": ([DPO, "--config.train.keep_checkpoints=0"], 2, "0 would delete the trained model"),
    "negative steps": ([DPO, "--config.train.num_steps=-1"], 2, "config.train.num_steps=-1: must be >= 0"),
    "zero beta": ([DPO, "--config.loss.beta=0"], 2, "config.loss.beta=0.0: must be > 0"),
    "zero accumulation": ([DPO, "--config.optim.grad_accum_steps=0"], 2, "config.optim.grad_accum_steps=0"),
    "non-finite step": (
        [DPO, "--config.train.nan_at_step=2"],
        1,
        "step 2 was not applied: non-finite gradient norm and updated parameters (its loss,",
    ),
    "vocabulary past the embedding": (
        [DPO, "--config.model.overrides.vocab_size=8"],
        1,
        "the tokenizer (config.data.tokenizer) has 15 tokens but the model's embedding has 8 rows "
        "(config.model.overrides.vocab_size)",
    ),
    "missing data file": (
        ["--config=experiments/dpo.py:runlocal", "--config.data.source=/nonexistent/pairs.jsonl"],
        1,
        "/nonexistent/pairs.jsonl",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_COMMANDS))
def test_user_errors_are_one_line_without_traceback(name, tmp_path):
    args, code, message = BAD_COMMANDS[name]
    workdir = tmp_path / "run"
    proc = run_main(*args, f"--workdir={workdir}")
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    if code == 2:
        assert not workdir.exists()  # usage errors stop before anything is written


def test_a_workdir_that_is_a_file_is_refused_and_left_alone(tmp_path):
    workdir = tmp_path / "notes.txt"
    workdir.write_text("keep me")
    proc = run_main(DPO, f"--workdir={workdir}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: --workdir={workdir} is a file, not a directory"
    assert workdir.read_text() == "keep me"


@pytest.fixture(scope="module")
def own_model_and_data(tmp_path_factory):
    """A tokenizer of 320 tokens, pairs, and HF Llamas: one with 64 embedding rows, one truncated."""
    from tests import hf_fixtures

    d = tmp_path_factory.mktemp("own")
    hf_fixtures.save_tokenizer(str(d / "tok"))
    hf_fixtures.write_pairs(str(d / "pairs.jsonl"))
    hf_fixtures.save_llama(str(d / "small_vocab"), vocab_size=64)
    hf_fixtures.save_llama(str(d / "truncated"), vocab_size=320)
    weights = d / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return d


@pytest.mark.parametrize(
    "model, message",
    [
        (
            "small_vocab",
            "error: the tokenizer (config.data.tokenizer) has 320 tokens but the model's embedding has 64 "
            "rows (config.model.path={d}/small_vocab)",
        ),
        ("truncated", "error: {d}/truncated/model.safetensors: not a complete safetensors file"),
    ],
)
def test_a_model_that_cannot_take_the_data_is_named_before_compute(
    own_model_and_data, model, message, tmp_path
):
    d = own_model_and_data
    proc = run_main(
        DPO,
        f"--config.model.path={d}/{model}",
        f"--config.data.tokenizer={d}/tok",
        f"--config.data.source={d}/pairs.jsonl",
        f"--workdir={tmp_path}",
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(message.format(d=d)), proc.stderr
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = run_main(
        "--config=experiments/dpo.py:runlocal",
        "--config.data.source=/nonexistent/pairs.jsonl",
        f"--workdir={tmp_path}",
        "--debug",
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_too_small_eval_split_names_the_key_and_leaves_a_run_that_says_it_has_no_checkpoint(tmp_path):
    """The refused run wrote its config.json but no checkpoint; scoring it as a policy names its
    missing checkpoints instead of reading that config.json as an HF model's."""
    from tests import hf_fixtures

    hf_fixtures.save_tokenizer(str(tmp_path / "tok"))
    data = hf_fixtures.write_pairs(str(tmp_path / "pairs.jsonl"), 24)
    proc = run_main(
        "--config=experiments/dpo.py:runlocal",
        f"--config.data.source={data}",
        f"--config.data.tokenizer={tmp_path / 'tok'}",
        "--config.data.eval_fraction=0.25",
        f"--workdir={tmp_path / 'run'}",
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    expected = f"error: config.data.eval_batch_size=32: {data} (eval split) has only 6 usable examples"
    assert expected in proc.stderr, proc.stderr
    score = run_main(
        f"--config=experiments/score.py:model={tmp_path / 'run'},source={data},mode=sum,runlocal",
        f"--config.data.tokenizer={tmp_path / 'tok'}",
        f"--workdir={tmp_path / 'score'}",
        timeout=300,
    )
    assert score.returncode == 1 and "Traceback" not in score.stderr
    errors = [line for line in score.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {tmp_path / 'run' / 'checkpoints'}: no checkpoint to load"], score.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
