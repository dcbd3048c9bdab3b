"""Fault injection on the real CLI (``python -m alignjax.main`` in subprocesses, tiny runlocal
configs): one run per workdir, config changes on resume, damaged checkpoints and metrics files, and
the rerun of a finished workdir. Wherever a resume follows a fault, its ``metrics.jsonl`` must equal
an uninterrupted run's byte for byte.

Two phases share every run (module fixture): the uninterrupted run, the lock holder and the refused
runs start at once; the damaged and changed copies of the finished uninterrupted run then rerun
together."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.faults.test_disk_full import tmpfs
from tests.train.test_loop import COMMON, ROOT, _steps, _wait_for_step

ARGS = [*COMMON, "--config.train.keep_checkpoints=3", "--config.train.plot=False"]


def _start(workdir, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen(
        [sys.executable, "-m", "alignjax.main", *ARGS, f"--workdir={workdir}", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc, timeout=400):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _lock(workdir, host, pid):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "lock.json"), "w") as f:
        json.dump({"host": host, "pid": pid, "started": 0.0}, f)


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _listing(root):
    return sorted(
        (os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
        for d, _, files in os.walk(root)
        for f in files
    )


def _cut_last_line(path):
    with open(path, "rb") as f:
        data = f.read()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[1]
    with open(path, "wb") as f:
        f.write(data[: len(data) - len(last) // 2 - 1])  # half of the last row, no newline


def _runs(base):
    d = {name: str(base / name) for name in ("clean", "held", "foreign")}
    # ---- phase 1: the uninterrupted run; a long run holding its workdir and a second run on it;
    # a workdir whose lock belongs to another host.
    clean = _start(d["clean"])
    holder = _start(d["held"], "--config.train.num_steps=100000")
    _lock(d["foreign"], "elsewhere.example", 4242)
    foreign = _start(d["foreign"])
    # a workdir on a disk too small for one checkpoint (a tmpfs; root only)
    d["full"] = str(base / "disk" / "run")
    on_tmpfs = tmpfs(str(base / "disk"), "600k")
    full = _start(d["full"]) if on_tmpfs else None
    _wait_for_step(holder, d["held"], 2)
    second = _start(d["held"])
    out = {"second": _finish(second), "foreign": _finish(foreign)}
    lock_while_held = os.path.exists(os.path.join(d["held"], "lock.json"))
    holder.send_signal(signal.SIGTERM)
    out["holder"] = _finish(holder)
    out["clean"] = _finish(clean)
    assert out["clean"][0] == 0, out["clean"]
    if full is not None:
        out["full"] = _finish(full)
        out["full_listing"] = _listing(d["full"])
        subprocess.run(["mount", "-o", "remount,size=64m", str(base / "disk")], check=True)

    # ---- phase 2: copies of the finished run, damaged or rerun with another config.
    copies = ("all_damaged", "truncated_array", "finished", "changed", "extended")
    for name in copies:
        d[name] = str(base / name)
        shutil.copytree(d["clean"], d[name])
    ck = os.path.join(d["all_damaged"], "checkpoints")
    shutil.rmtree(os.path.join(ck, "6"))
    os.mkdir(os.path.join(ck, "6"))
    shutil.rmtree(os.path.join(ck, "4", "manifest"))
    with open(os.path.join(ck, "2", "manifest", "metadata"), "w") as f:
        f.write("{not json")
    _lock(d["all_damaged"], socket.gethostname(), _dead_pid())  # a SIGKILLed run's
    arrays = os.path.join(d["truncated_array"], "checkpoints", "6", "state", "ocdbt.process_0", "d")
    largest = max(os.listdir(arrays), key=lambda f: os.path.getsize(os.path.join(arrays, f)))
    os.truncate(os.path.join(arrays, largest), 1000)
    _cut_last_line(os.path.join(d["truncated_array"], "perf.jsonl"))
    _cut_last_line(os.path.join(d["truncated_array"], "metrics.jsonl"))
    _lock(d["finished"], "elsewhere.example", 4242)
    before = {name: _listing(d[name]) for name in ("finished", "changed")}
    procs = {
        "all_damaged": _start(d["all_damaged"]),
        "truncated_array": _start(d["truncated_array"]),
        "finished": _start(d["finished"], "--config.train.break_lock=true"),
        "changed": _start(d["changed"], "--config.optim.learning_rate=0.001", "--config.seed=7"),
        "extended": _start(
            d["extended"],
            "--config.train.num_steps=8",
            "--config.optim.learning_rate=0.001",
            "--config.train.allow_config_change=true",
        ),
    }
    if full is not None:
        procs["full_rerun"] = _start(d["full"])
    out.update({name: _finish(p) for name, p in procs.items()})
    return dict(dirs=d, out=out, before=before, lock_while_held=lock_while_held)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    try:
        yield _runs(base)
    finally:
        if os.path.ismount(base / "disk"):
            subprocess.run(["umount", str(base / "disk")], check=True)


def _read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def _one_error_line(err):
    lines = [x for x in err.splitlines() if x.strip() and "WARNING" not in x]
    assert "Traceback" not in err, err
    (line,) = [x for x in lines if x.startswith("error: ")]
    return line


def test_second_run_on_a_workdir_is_refused_naming_the_holder(runs):
    rc, out, err = runs["out"]["second"]
    assert rc == 1, (out, err)
    line = _one_error_line(err)
    assert "is in use by another run (pid " in line and socket.gethostname() in line
    assert "--config.train.break_lock=true" in line and "lock.json" in line
    assert runs["lock_while_held"]
    # The holder trained on, undisturbed, and released the lock when SIGTERM stopped it.
    rc, out, err = runs["out"]["holder"]
    assert rc == 0 and "SIGTERM: saved checkpoint at step" in out, (out, err)
    held = runs["dirs"]["held"]
    steps = [r["step"] for r in _steps(held) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # no step twice
    assert not os.path.exists(os.path.join(held, "lock.json"))


def test_a_foreign_lock_is_refused_and_break_lock_takes_it(runs):
    rc, out, err = runs["out"]["foreign"]
    assert rc == 1 and "pid 4242 on elsewhere.example" in _one_error_line(err)
    assert sorted(os.listdir(runs["dirs"]["foreign"])) == ["lock.json"]  # nothing written
    rc, out, err = runs["out"]["finished"]
    assert rc == 0, (out, err)
    assert "taking over the lock of pid 4242 on elsewhere.example" in out
    assert "(--config.train.break_lock=true)" in out
    assert not os.path.exists(os.path.join(runs["dirs"]["finished"], "lock.json"))


def test_a_killed_runs_lock_on_this_host_is_taken_over(runs):
    rc, out, err = runs["out"]["all_damaged"]
    assert rc == 0, (out, err)
    assert f"on {socket.gethostname()}, started" in out and "(its process is gone)" in out


def test_rerunning_a_finished_workdir_adds_no_rows(runs):
    d = runs["dirs"]
    assert _read(os.path.join(d["finished"], "metrics.jsonl"), "rb") == _read(
        os.path.join(d["clean"], "metrics.jsonl"), "rb"
    )
    after = dict(_listing(d["finished"]))
    before = dict(runs["before"]["finished"])
    before.pop("lock.json")
    for name in ("metrics.jsonl", "perf.jsonl", "config.json"):
        assert after[name] == before[name]
    assert "config_history.jsonl" not in after


def test_damaged_newest_checkpoints_are_moved_aside_and_the_run_resumes_identically(runs):
    d = runs["dirs"]
    clean = _read(os.path.join(d["clean"], "metrics.jsonl"), "rb")
    rc, out, err = runs["out"]["truncated_array"]
    assert rc == 0 and "Traceback" not in err, (out, err)
    assert "checkpoint step 6 in" in out and "damaged (state does not restore:" in out
    ck = os.path.join(d["truncated_array"], "checkpoints")
    assert os.listdir(os.path.join(ck, "damaged")) == ["6-bad-state"]
    assert _read(os.path.join(d["truncated_array"], "metrics.jsonl"), "rb") == clean
    # The cut perf.jsonl row (step 6) was dropped and written again; rows up to the restored step 4
    # are the uninterrupted run's (speed is not reproducible; the first window after a restart,
    # step 5, is not measured).
    perf = [json.loads(x) for x in _read(os.path.join(d["truncated_array"], "perf.jsonl")).splitlines()]
    clean_perf = [json.loads(x) for x in _read(os.path.join(d["clean"], "perf.jsonl")).splitlines()]
    assert [r for r in perf if r["step"] <= 4] == [r for r in clean_perf if r["step"] <= 4]
    assert [r["step"] for r in perf if r["step"] > 4] == [6]
    assert "dropped a partial last line" in out
    assert sorted(int(s) for s in os.listdir(ck) if s.isdigit())[-1] == 6


def test_with_every_checkpoint_damaged_the_run_starts_over_and_says_so(runs):
    d = runs["dirs"]
    rc, out, err = runs["out"]["all_damaged"]
    assert rc == 0 and "Traceback" not in err, (out, err)
    ck = os.path.join(d["all_damaged"], "checkpoints")
    assert "checkpoint step 6 in" in out and "damaged (the step directory is empty)" in out
    assert "checkpoint step 4 in" in out and "damaged (its 'manifest' item is missing)" in out
    assert "checkpoint step 2 in" in out and "damaged (manifest does not restore:" in out
    assert "no usable checkpoint left in" in out and "starting from step 0" in out
    damaged = sorted(os.listdir(os.path.join(ck, "damaged")))
    assert damaged == ["2-bad-manifest", "4-no-manifest", "6-empty"]
    assert os.listdir(os.path.join(ck, "damaged", "4-no-manifest"))  # moved, not deleted
    clean = _read(os.path.join(d["clean"], "metrics.jsonl"), "rb")
    assert _read(os.path.join(d["all_damaged"], "metrics.jsonl"), "rb") == clean


def test_a_changed_config_is_refused_with_a_diff_before_anything_is_written(runs):
    rc, out, err = runs["out"]["changed"]
    assert rc == 1, (out, err)
    line = _one_error_line(err)
    assert "trained to step 6 with a different config" in line
    assert "optim.learning_rate: 0.0005 -> 0.001" in line and "seed: 0 -> 7" in line
    assert "--config.train.allow_config_change=true" in line
    assert _listing(runs["dirs"]["changed"]) == runs["before"]["changed"]  # config.json too


def test_an_allowed_change_is_recorded_with_its_step_and_config_json_kept(runs):
    d = runs["dirs"]
    rc, out, err = runs["out"]["extended"]
    assert rc == 0, (out, err)
    assert _read(os.path.join(d["extended"], "config.json")) == _read(os.path.join(d["clean"], "config.json"))
    history = _read(os.path.join(d["extended"], "config_history.jsonl"))
    (entry,) = [json.loads(x) for x in history.splitlines()]
    assert entry["step"] == 6 and entry["allowed_by"] == "train.allow_config_change"
    assert entry["changes"] == {"optim.learning_rate": [0.0005, 0.001], "train.num_steps": [6, 8]}
    steps = [r["step"] for r in _steps(d["extended"]) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    from alignjax.export import read_config  # what an export of the workdir describes

    config = read_config(d["extended"])
    assert config["optim"]["learning_rate"] == 0.001 and config["train"]["num_steps"] == 8


def test_a_full_disk_stops_the_run_in_one_line_and_a_rerun_with_space_resumes_identically(runs):
    if "full" not in runs["out"]:
        pytest.skip("mounting a tmpfs needs root")
    rc, out, err = runs["out"]["full"]
    assert rc == 1, (out, err)
    line = _one_error_line(err)
    full = runs["dirs"]["full"]
    expected = f"error: no space for checkpoint step 2 in {full}/checkpoints: it needs about "
    assert line.startswith(expected), line
    assert line.endswith("MiB are free; free space on it (or use another --workdir) and rerun to start again")
    left = [f for f, _ in runs["out"]["full_listing"]]
    assert not [f for f in left if f.startswith("checkpoints/")] and "lock.json" not in left
    rc, out, err = runs["out"]["full_rerun"]
    assert rc == 0, (out, err)
    clean = runs["dirs"]["clean"]
    assert _read(os.path.join(full, "metrics.jsonl")) == _read(os.path.join(clean, "metrics.jsonl"))
