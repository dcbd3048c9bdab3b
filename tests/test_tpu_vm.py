"""launch/tpu_vm.sh --dry_run: the commands it would run, in order, and the exact command each
worker runs; nothing is executed (a ``gcloud`` first on PATH fails the script if it is called)."""

import os
import shlex
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_vm.sh")
ENV = {
    "TPU_NAME": "dpo-v4",
    "ZONE": "us-central2-b",
    "ACCELERATOR": "v4-32",
    "CONFIG": "experiments/dpo.py:model=tiny,loss=ipo",
    "WORKDIR": "gs://bucket/runs/dpo",
    "EXTRA_FLAGS": "--config.train.num_steps=3 --config.mesh.fsdp=4",
}


def _dry_run(tmp_path, args=(), **env):
    guard = tmp_path / "bin"
    guard.mkdir(exist_ok=True)
    gcloud = guard / "gcloud"
    gcloud.write_text(f"#!/bin/sh\ntouch {tmp_path}/gcloud-called\nexit 97\n")
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    full = dict(os.environ, PATH=f"{guard}:{os.environ['PATH']}", LOG_DIR=str(tmp_path / "logs"), **ENV)
    full.update(env)
    return subprocess.run(
        ["bash", SCRIPT, *args], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=60
    )


def _commands(out: str) -> list[list[str]]:
    """The ``+ cmd`` lines as argv lists (they are printed shell-quoted)."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("how", ["env", "flag"])
def test_dry_run_prints_every_command_and_runs_none(tmp_path, how):
    proc = _dry_run(tmp_path, ["--dry_run"]) if how == "flag" else _dry_run(tmp_path, DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "gcloud-called").exists() and not (tmp_path / "logs").exists()  # nothing ran
    commands = _commands(proc.stdout)
    steps = [c[2:5] if c[:2] == ["gcloud", "compute"] else c[:3] for c in commands]
    assert steps == [
        ["gcloud", "storage", "ls"],  # the bucket, before a VM exists
        ["tpus", "tpu-vm", "create"],
        ["tar", "czf", "/tmp/alignjax.tgz"],
        ["tpus", "tpu-vm", "scp"],
        *[["tpus", "tpu-vm", "ssh"]] * 5,  # unpack, install, check the bucket, train, save the log
        ["mkdir", "-p", str(tmp_path / "logs")],
        ["gcloud", "storage", "cp"],
        ["tpus", "tpu-vm", "delete"],  # last: after the logs are in the bucket
    ]
    assert commands[0][-1] == "gs://bucket"
    worker = [c[-1].removeprefix("--command=") for c in commands if "ssh" in c]
    assert all("--worker=all" in c for c in commands if "ssh" in c)
    printed = [
        line.removeprefix("worker command: ") for line in proc.stdout.splitlines() if "worker command" in line
    ]
    assert printed == worker[2:]  # the readable lines are exactly what the workers get

    check, train, save = worker[2:]
    assert shlex.split(check)[-4:] == ["-m", "alignjax.storage", "check", "gs://bucket/runs/dpo"]
    main = shlex.split(train.split(" && ", 1)[1].split(" 2>&1 ")[0])
    assert main == [
        ".venv/bin/python",
        "-m",
        "alignjax.main",
        "--config=experiments/dpo.py:model=tiny,loss=ipo",
        "--workdir=gs://bucket/runs/dpo",
        "--config.distributed.enabled=True",
        "--config.train.num_steps=3",
        "--config.mesh.fsdp=4",
    ]
    assert train.startswith("set -o pipefail;")  # the run's status, not tee's
    assert "alignjax.storage copy ~/run.log 'gs://bucket/runs/dpo/logs/'$(hostname).log" in save
    for command in worker:
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0  # valid shell
    assert "'.[gcs]'" in worker[1]  # gcsfs on the workers


def test_local_workdir_is_refused_unless_the_vm_is_kept(tmp_path):
    proc = _dry_run(tmp_path, DRY_RUN="1", WORKDIR="workdirs/dpo")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: WORKDIR=workdirs/dpo is on the VM's disk, which is deleted at the end: "
        "use a gs:// WORKDIR (or KEEP=1)"
    ]
    kept = _dry_run(tmp_path, DRY_RUN="1", WORKDIR="workdirs/dpo", KEEP="1")
    assert kept.returncode == 0, kept.stderr
    assert not any("delete" in c for c in _commands(kept.stdout))
