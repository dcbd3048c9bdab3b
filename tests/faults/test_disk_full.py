"""A full disk while a checkpoint is written (async, as the trainer saves): one DiskFull naming the
directory, no temporary step left, nothing printed, the previous step still restores. On a real
tmpfs, so the test needs root (mount); the CLI case is in ``test_workdir.py``."""

import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from alignjax.train import checkpoint as ckpt

MANIFEST = {"model_config": {}, "param_shapes": {}}


def tmpfs(path, size):
    """Mounts a tmpfs of ``size`` at ``path``; False where this process may not mount."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path]).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    path = str(tmp_path / "disk")
    if not tmpfs(path, "2m"):
        pytest.skip("mounting a tmpfs needs root")
    yield path
    subprocess.run(["umount", path], check=True)


def test_running_out_of_space_mid_write_leaves_the_previous_step(small_disk, monkeypatch, capfd):
    small = {"w": jnp.arange(1000, dtype=jnp.float32)}
    big = {"w": jnp.arange(900_000, dtype=jnp.float32)}  # 3.6 MB on a 2 MiB disk
    manager = ckpt.Checkpointer(os.path.join(small_disk, "ck"), keep=3, async_save=True)
    manager.save(1, small, {"epoch": 0}, MANIFEST)
    manager.wait()
    monkeypatch.setattr(ckpt, "fits", lambda needed, free: True)  # past the up-front check
    with pytest.raises(
        ckpt.DiskFull,
        match=r"no space left on device writing a checkpoint in .*/ck; its partial files were removed; free "
        "space on it .* rerun to resume from step 1",
    ):
        manager.save(2, big, {"epoch": 0}, MANIFEST)
        manager.wait()
    manager.close()
    assert sorted(os.listdir(os.path.join(small_disk, "ck"))) == ["1"]
    assert "Traceback" not in capfd.readouterr().err
    abstract = {"w": jnp.zeros(1000, jnp.float32)}
    step, state, _ = ckpt.Checkpointer(os.path.join(small_disk, "ck")).restore_latest(abstract, MANIFEST)
    assert step == 1 and np.array_equal(state["w"], small["w"])


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(small_disk):
    manager = ckpt.Checkpointer(os.path.join(small_disk, "ck"), keep=3, async_save=True)
    with pytest.raises(
        ckpt.DiskFull,
        match=r"no space for checkpoint step 3 in .*/ck: it needs about 3.3 MiB and 2.0 MiB are free; .* "
        "rerun to start again",
    ):
        manager.save(3, {"w": jnp.zeros(600_000, jnp.float32)}, {"epoch": 0}, MANIFEST)
    manager.close()
    assert os.listdir(os.path.join(small_disk, "ck")) == []
