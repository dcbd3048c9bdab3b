"""gs:// workdirs end to end against a real GCS emulator (fake-gcs-server, tests/gcs_emulator.py):
a DPO run SIGKILLed after its first committed checkpoint and rerun writes the same metrics.jsonl,
byte for byte, as an uninterrupted run; config, summary, TensorBoard events, the plot and the
checkpoints are objects in the bucket, and nothing lands in a local directory named ``gs:``."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from tests.gcs_emulator import running
from tests.train.test_loop import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"
STEPS = 10
COMMON = [
    f"--config={ROOT}/experiments/dpo.py:model=tiny,runlocal,steps={STEPS}",
    "--config.train.checkpoint_every=2",
    "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=0",
    "--config.data.max_length=10",
    "--config.train.progress=False",
    "--config.data.num_eval=16",
    "--config.data.eval_batch_size=16",
    *SMALL,
]


@pytest.fixture(scope="session")
def gcs():
    with running(BUCKET) as emulator:
        yield emulator


def _start(gcs, cwd, workdir):
    # cwd is an empty directory of the test's own: a gs:// path mistaken for a local one would
    # appear in it as "gs:/bucket/...".
    env = dict(
        os.environ,
        **gcs.env,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        PYTHONPATH=ROOT,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "alignjax.main", *COMMON, f"--workdir={workdir}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _committed_steps(fs, run):
    """Checkpoint steps that orbax has committed (on an object store: a commit_success.txt)."""
    root = f"{BUCKET}/{run}/checkpoints"
    names = [p.rsplit("/", 1)[1] for p in fs.ls(root)] if fs.exists(root) else []
    return sorted(int(n) for n in names if n.isdigit() and fs.exists(f"{root}/{n}/commit_success.txt"))


@pytest.fixture(scope="module")
def runs(gcs, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    fs = gcs.filesystem()
    clean = _start(gcs, cwd, f"gs://{BUCKET}/clean")
    killed = _start(gcs, cwd, f"gs://{BUCKET}/killed")
    deadline = time.time() + 240
    while not _committed_steps(fs, "killed"):
        assert killed.poll() is None, killed.stdout.read()
        assert time.time() < deadline, "no checkpoint committed in gs://bucket/killed"
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    at_kill = _committed_steps(fs, "killed")
    finished_before_kill = fs.exists(f"{BUCKET}/killed/summary.json")
    resumed = _start(gcs, cwd, f"gs://{BUCKET}/killed")
    outs = {name: p.communicate(timeout=300)[0] for name, p in (("clean", clean), ("resumed", resumed))}
    assert clean.returncode == 0, outs["clean"]
    assert resumed.returncode == 0, outs["resumed"]
    return dict(fs=fs, cwd=cwd, at_kill=at_kill, finished_before_kill=finished_before_kill)


def test_sigkill_and_rerun_on_gcs_gives_identical_metrics(runs):
    fs = runs["fs"]
    # The kill landed mid-run: a checkpoint short of the last one, no summary yet.
    assert runs["at_kill"] and max(runs["at_kill"]) < STEPS and not runs["finished_before_kill"]
    clean = fs.cat(f"{BUCKET}/clean/metrics.jsonl")
    assert fs.cat(f"{BUCKET}/killed/metrics.jsonl") == clean  # bytes
    rows = [json.loads(line) for line in clean.decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert _committed_steps(fs, "killed") == [STEPS - 2, STEPS]  # keep 2
    assert not os.listdir(runs["cwd"])  # nothing written to a local "gs:" directory


def test_workdir_files_are_objects_in_the_bucket(runs, tmp_path):
    fs = runs["fs"]
    run = f"{BUCKET}/killed"
    config = json.loads(fs.cat(f"{run}/config.json"))
    assert config["train"]["num_steps"] == STEPS
    summary = json.loads(fs.cat(f"{run}/summary.json"))
    rows = [json.loads(line) for line in fs.cat(f"{run}/metrics.jsonl").decode().splitlines()]
    assert summary["steps"] == STEPS and summary["train/loss"] == rows[-2]["loss"]
    assert fs.cat(f"{run}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fs.cat(f"{BUCKET}/clean/perf.jsonl").decode().splitlines()) >= 1

    # TensorBoard: every train loss of metrics.jsonl is a scalar event in the bucket (the resumed
    # run logs the steps past its checkpoint again, in a second file: the last value counts).
    events = sorted(p for p in fs.find(f"{run}/tb") if "tfevents" in p)
    assert events
    logged = {}
    for path in events:
        logged.update(_scalars(fs.cat(path), "loss"))
    expected = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert logged.keys() == expected.keys()
    assert all(logged[s] == pytest.approx(v, rel=1e-6) for s, v in expected.items())


def _scalars(data: bytes, tag: str) -> dict[int, float]:
    """``{step: value}`` of ``tag`` in a TensorBoard event file: TFRecord framing (length, its
    CRC, the ``Event`` proto, its CRC) around ``Event`` protos."""
    from tensorboardX.proto.event_pb2 import Event

    out, i = {}, 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i : i + 8])
        event = Event.FromString(data[i + 12 : i + 12 + length])
        i += 12 + length + 4
        for value in event.summary.value:
            if value.tag == tag:
                out[event.step] = value.simple_value
    return out


def test_storage_check_and_copy_as_the_workers_run_them(gcs, tmp_path):
    """What launch/tpu_vm.sh runs on each worker before training (check) and after it (copy)."""
    env = dict(os.environ, **gcs.env, PYTHONPATH=ROOT)

    def storage(*args):
        return subprocess.run(
            [sys.executable, "-m", "alignjax.storage", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = storage("check", f"gs://{BUCKET}/probe/run")
    assert ok.returncode == 0 and ok.stdout.strip() == f"ok: gs://{BUCKET}/probe/run is writable", ok.stderr
    assert not gcs.filesystem().find(f"{BUCKET}/probe")  # the probe object is gone again
    missing = storage("check", "gs://no-such-bucket/run")
    assert missing.returncode == 1
    assert (
        missing.stderr.strip().splitlines()[-1].startswith("error: gs://no-such-bucket/run is not writable")
    )
    log = tmp_path / "run.log"
    log.write_bytes(b"step 1\nstep 2\n")
    assert storage("copy", str(log), f"gs://{BUCKET}/probe/logs/worker.log").returncode == 0
    assert gcs.filesystem().cat(f"{BUCKET}/probe/logs/worker.log") == log.read_bytes()
