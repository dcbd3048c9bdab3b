"""The workdir lock on gs:// against a real GCS emulator (fake-gcs-server): the create-if-absent
upload (``if_generation_match=0``) lets exactly one of two runs take it, a release deletes only the
lock it took, and a lock left by a dead process on this host (or by an earlier process with this pid) is taken
over."""

import json
import os
import socket
import subprocess

import pytest

from tests.gcs_emulator import running

BUCKET = "locks"


@pytest.fixture(scope="module")
def gcs():
    with running(BUCKET) as emulator:
        yield emulator


@pytest.fixture
def env(gcs, monkeypatch):
    for key, value in gcs.env.items():
        monkeypatch.setenv(key, value)
    return gcs


def test_create_if_absent_lets_one_writer_win(env):
    from alignjax import storage

    lock = f"gs://{BUCKET}/excl/lock.json"
    assert storage.create_exclusive(lock, "first")
    assert not storage.create_exclusive(lock, "second")
    assert env.filesystem().cat(f"{BUCKET}/excl/lock.json") == b"first"
    storage.remove_if(lock, "second")  # not ours: kept
    assert env.filesystem().exists(f"{BUCKET}/excl/lock.json")
    storage.remove_if(lock, "first")
    assert not env.filesystem().exists(f"{BUCKET}/excl/lock.json")


def test_second_run_refused_then_released_then_stale_taken_over(env, capsys):
    from alignjax.train import workdir

    root = f"gs://{BUCKET}/run"
    fs = env.filesystem()
    with workdir.locked(root):
        held = json.loads(fs.cat(f"{BUCKET}/run/lock.json"))
        assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(workdir.WorkdirLocked, match=rf"in use by another run \(pid {os.getpid()} on "):
            with workdir.locked(root):
                pass
    assert not fs.exists(f"{BUCKET}/run/lock.json")  # released

    dead = subprocess.Popen(["true"])
    dead.wait()
    fs.pipe(f"{BUCKET}/run/lock.json", json.dumps({"host": socket.gethostname(), "pid": dead.pid}).encode())
    with workdir.locked(root):
        assert json.loads(fs.cat(f"{BUCKET}/run/lock.json"))["pid"] == os.getpid()
    assert "(its process is gone)" in capsys.readouterr().out
    assert not fs.exists(f"{BUCKET}/run/lock.json")

    # A restarted container can give this process the pid its killed predecessor had.
    mine = {"host": socket.gethostname(), "pid": os.getpid()}
    fs.pipe(f"{BUCKET}/run/lock.json", json.dumps(mine).encode())
    with workdir.locked(root):
        pass
    assert "(its process is gone)" in capsys.readouterr().out
