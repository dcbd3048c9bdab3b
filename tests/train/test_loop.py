"""The train loop end to end: exact resume after SIGKILL, SIGTERM, NaN stop, shape mismatch,
reference cache, summary/plot, and 2-process training equal to 1-process."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Width 128, not 32: under logprobs.STRICT_ROUNDING XLA:CPU's legacy emitters unroll tiny loops
# fully, and a width-32 step compiled about 2x slower.
SMALL = [
    "--config.model.overrides.vocab_size=16",
    "--config.model.overrides.hidden_size=128",
    "--config.model.overrides.num_layers=1",
    "--config.model.overrides.num_heads=2",
    "--config.model.overrides.num_kv_heads=2",
    "--config.model.overrides.intermediate_size=256",
]
COMMON = [
    "--config=experiments/dpo.py:runlocal,steps=6",
    "--config.train.checkpoint_every=2",
    "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=0",
    "--config.data.max_length=10",
    "--config.train.progress=False",
    "--config.train.tensorboard=False",
    "--config.data.num_eval=16",
    "--config.data.eval_batch_size=16",
    "--config.train.async_checkpoints=True",
    *SMALL,
]


def _start(workdir, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen(
        [sys.executable, "-m", "alignjax.main", *COMMON, f"--workdir={workdir}", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip() and line.endswith("\n")]


def _wait_for_step(proc, workdir, step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(r["step"] >= step and "loss" in r for r in _steps(workdir)):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {workdir}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the uninterrupted, the SIGKILLed and the SIGTERMed runs and the 2-process run at once."""
    base = tmp_path_factory.mktemp("loop")
    dirs = {name: str(base / name) for name in ("clean", "killed", "termed", "interrupted", "multi")}
    clean = _start(dirs["clean"])
    killed = _start(dirs["killed"])
    termed = _start(dirs["termed"], "--config.train.num_steps=400")
    interrupted = _start(dirs["interrupted"], "--config.train.num_steps=400")
    _wait_for_step(killed, dirs["killed"], 3)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    _wait_for_step(termed, dirs["termed"], 2)
    termed.send_signal(signal.SIGTERM)
    term_out = termed.communicate(timeout=240)[0]
    _wait_for_step(interrupted, dirs["interrupted"], 2)
    interrupted.send_signal(signal.SIGINT)  # what Ctrl-C sends
    int_out = interrupted.communicate(timeout=240)[0]
    resumed = _start(dirs["killed"])
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import local

    os.makedirs(dirs["multi"], exist_ok=True)
    multi_rc = local.launch(
        [*COMMON, f"--workdir={dirs['multi']}", "--config.train.num_steps=3"],
        2,
        log_dir=dirs["multi"],
        timeout=300,
    )
    clean_out = clean.communicate(timeout=300)[0]
    resumed_out = resumed.communicate(timeout=300)[0]
    assert clean.returncode == 0, clean_out
    assert resumed.returncode == 0, resumed_out
    return dict(
        dirs=dirs,
        SIGTERM=(termed.returncode, term_out, dirs["termed"]),
        SIGINT=(interrupted.returncode, int_out, dirs["interrupted"]),
        multi_rc=multi_rc,
    )


def test_sigkill_then_restart_gives_identical_metrics(runs):
    clean, killed = _steps(runs["dirs"]["clean"]), _steps(runs["dirs"]["killed"])
    assert [r["step"] for r in clean if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert clean == killed  # line by line, every metric, bit for bit
    for name in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "learning_rate",
    ):
        assert name in clean[0]


def test_summary_and_plot(runs):
    workdir = runs["dirs"]["clean"]
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["data/rows_kept"] == 7500 and summary["data/rows_skipped"] == 0
    assert (
        0.0 <= summary["eval/ranking_accuracy"] <= 1.0 and "eval/idealized_ranking_accuracy/beta=1" in summary
    )
    assert summary["train/loss"] == _steps(workdir)[-2]["loss"]  # the last train line precedes the eval line
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]  # keep 2, no tmp dirs


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_stop_signal_saves_and_exits_cleanly(runs, name):
    rc, out, workdir = runs[name]
    assert rc == 0, out
    saved = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert f"{name}: saved checkpoint at step {saved}" in out
    assert 2 <= saved < 400


def test_two_processes_match_one(runs):
    assert runs["multi_rc"] == 0, open(os.path.join(runs["dirs"]["multi"], "process_0.log")).read()[-3000:]
    one = [r["loss"] for r in _steps(runs["dirs"]["clean"]) if "loss" in r][:3]
    two = [r["loss"] for r in _steps(runs["dirs"]["multi"]) if "loss" in r][:3]
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)


def _inprocess_config(workdir_steps=4, **changes):
    from alignjax.main import load_config_file

    c = load_config_file("experiments/dpo.py:runlocal,steps=4")
    c.model.overrides.update(
        dict(vocab_size=16, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    )
    c.data.max_length, c.data.num_eval, c.data.eval_batch_size = 10, 16, 16
    c.train.update(dict(checkpoint_every=2, progress=False, tensorboard=False, plot=False))
    for key, value in changes.items():
        section, field = key.split("__")
        c[section][field] = value
    return c


def test_nan_stops_naming_the_step_and_keeps_last_good_checkpoint_then_shape_mismatch(tmp_path):
    from alignjax.train.checkpoint import CheckpointMismatch
    from alignjax.train.loop import NonFiniteStep, run_train

    with pytest.raises(
        NonFiniteStep,
        match=r"step 3 was not applied: non-finite gradient norm and updated parameters \(its "
        r"loss, [0-9.]+, was finite\); stopping. The last good checkpoint \(step 2\)",
    ):
        run_train(_inprocess_config(train__nan_at_step=3), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert [r["step"] for r in _steps(str(tmp_path))] == [1, 2]
    bigger = _inprocess_config()
    bigger.model.overrides.hidden_size = 48
    with pytest.raises(
        CheckpointMismatch,
        match=r"different model and cannot be resumed: .*embedding.*\[16, 32\]"
        r" vs model \[16, 48\].*hidden_size",
    ):
        run_train(bigger, str(tmp_path))


def test_reference_cache_equals_frozen_reference(tmp_path):
    from alignjax.train.loop import run_train

    frozen = run_train(_inprocess_config(train__num_steps=2), str(tmp_path / "frozen"))
    cache_dir = str(tmp_path / "cache")
    cached = run_train(
        _inprocess_config(train__num_steps=2, reference__kind="cache", reference__cache_dir=cache_dir),
        str(tmp_path / "cached"),
    )
    a, b = _steps(str(tmp_path / "frozen")), _steps(str(tmp_path / "cached"))
    for ra, rb in zip(a[:2], b[:2]):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["rewards/margins"] == pytest.approx(ra["rewards/margins"], rel=1e-4, abs=1e-6)
    (key,) = os.listdir(cache_dir)
    files = os.listdir(os.path.join(cache_dir, key))
    mtimes = {f: os.path.getmtime(os.path.join(cache_dir, key, f)) for f in files}
    run_train(
        _inprocess_config(train__num_steps=2, reference__kind="cache", reference__cache_dir=cache_dir),
        str(tmp_path / "cached2"),
    )
    assert {f: os.path.getmtime(os.path.join(cache_dir, key, f)) for f in files} == mtimes  # built once
    assert frozen.summary["train/loss"] == pytest.approx(cached.summary["train/loss"], rel=1e-5)


@pytest.mark.parametrize("cut", [0, 3], ids=["head-everywhere", "head-at-counted"])
@pytest.mark.parametrize("reference", ["frozen", "cache"])
def test_mixed_precision_step_at_the_reference_gives_log2_exactly(tmp_path, monkeypatch, reference, cut):
    """fp32 master weights + bf16 compute: the frozen reference is stored in bf16, and the policy and
    reference forwards (one program, or the cache's own program) round alike, so step 1 is DPO at
    the reference exactly -- loss log 2, margins 0 -- as in PyTorch (it was 0.6917 with XLA's default
    excess precision, see logprobs.STRICT_ROUNDING). ``cut``: ``data.max_completion_length``, which
    puts the step's head (and the cache's) at the counted tokens only."""
    import types

    import jax
    import jax.numpy as jnp

    from alignjax import logprobs
    from alignjax.train import reference as reference_module
    from alignjax.train.loop import run_train

    # the widths the cache's program asks for (at this size both paths give the same values)
    cache_widths = []

    def recorded(*args, **kwargs):
        cache_widths.append(kwargs.get("logit_width"))
        return logprobs.batch_sequence_logps(*args, **kwargs)

    spy = types.SimpleNamespace(**{**vars(logprobs), "batch_sequence_logps": recorded})
    monkeypatch.setattr(reference_module, "logprobs", spy)

    config = _inprocess_config(
        train__num_steps=1,
        model__compute_dtype="bfloat16",
        model__remat="full",
        model__attention_kernel="xla",
        reference__kind=reference,
        reference__cache_dir=str(tmp_path / "cache"),
        data__max_completion_length=cut,
    )
    config.model.overrides.update(hidden_size=64, num_layers=2, intermediate_size=128)
    from alignjax.train.step import make_step_spec

    assert make_step_spec(config, 2, "model").logit_width == (cut or None)
    result = run_train(config, str(tmp_path / "run"))
    built = result.model.config
    assert (built.dtype, built.remat, built.attention_kernel) == ("bfloat16", "full", "xla")
    state = result.state
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
    if reference == "frozen":
        assert {x.dtype for x in jax.tree.leaves(state["ref_params"])} == {jnp.dtype(jnp.bfloat16)}
    first = next(r for r in _steps(str(tmp_path / "run")) if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2.0), rel=0, abs=1e-7)
    assert first["rewards/margins"] == 0.0 and first["rewards/chosen"] == 0.0
    assert set(cache_widths) == ({cut or None} if reference == "cache" else set())


def test_perf_metrics_go_to_their_own_file(tmp_path):
    """perf.jsonl gets the speed of each window between logged steps (not the first, which compiles),
    its FLOPs per token within the accounting's bounds for this model and batch; metrics.jsonl stays
    free of timings (it is rewritten bit for bit on resume)."""
    import statistics

    import jax

    from alignjax import flops
    from alignjax.train.loop import run_train

    config = _inprocess_config(train__num_steps=5, train__log_every=1)
    result = run_train(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "perf.jsonl")]
    assert [r["step"] for r in rows] == [2, 3, 4, 5]
    assert not any(k.startswith("perf/") for r in _steps(str(tmp_path)) for k in r)
    model_config = result.model.config
    n = flops.param_counts(model_config)["N"]
    attn_per_pair = 4 * model_config.num_heads * model_config.head_dim * model_config.num_layers
    for r in rows:
        assert r["perf/step_s"] > 0
        per_token = r["perf/model_tflop_per_s_per_device"] * 1e12 * jax.local_device_count()
        per_token /= r["perf/tokens_per_s"]
        # policy 6N + reference 2N per token, plus (3 + 1) x the attention of at most T/2 pairs a token
        bound = 8 * n + 4 * attn_per_pair * (config.data.max_length + 1) / 2
        assert 8 * n < per_token <= bound * (1 + 1e-9)
    median = statistics.median(r["perf/tokens_per_s"] for r in rows)
    assert result.summary["perf/tokens_per_s"] == pytest.approx(median)


def test_an_update_that_makes_parameters_infinite_under_a_finite_loss_is_never_applied(tmp_path):
    from alignjax.train.loop import NonFiniteStep, run_train

    # lr 1e39: the first AdamW update (about lr in size) overflows float32; loss and gradients are finite.
    config = _inprocess_config(optim__learning_rate=1e39, train__checkpoint_every=1)
    with pytest.raises(
        NonFiniteStep,
        match=r"^step 1 was not applied: non-finite updated parameters \(its loss, 0.693147, was finite\); "
        r"stopping. No checkpoint was saved before it",
    ):
        run_train(config, str(tmp_path))
    assert not os.listdir(tmp_path / "checkpoints")


def test_a_run_whose_gradients_stay_exactly_zero_says_so(tmp_path, capsys):
    from alignjax.train.guards import ZERO_GRAD_STREAK
    from alignjax.train.loop import run_train

    # lr 1e5 saturates the tiny model by step 3: every later gradient is exactly 0, every loss finite.
    config = _inprocess_config(optim__learning_rate=1e5, train__num_steps=10, train__log_every=1)
    summary = run_train(config, str(tmp_path)).summary
    zero = [r["step"] for r in _steps(str(tmp_path)) if r.get("grad_norm") == 0.0]
    assert zero == list(range(3, 11))
    assert summary["train/zero_grad_steps"] == len(zero)
    assert f"grad_norm has been exactly 0 for {ZERO_GRAD_STREAK} steps (steps 3-7)" in capsys.readouterr().out
