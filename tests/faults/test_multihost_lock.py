"""The workdir lock on a slice: process 0 takes it for all; when it is refused, every process stops
with one line (two real ``jax.distributed`` processes through ``launch/local.py``)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch"))

import local  # noqa: E402  (launch/ is not a package)

from tests.test_multiprocess import RUN  # noqa: E402


def test_a_refused_lock_stops_every_process_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = {"host": "elsewhere.example", "pid": 4242, "started": 0.0}
    (workdir / "lock.json").write_text(json.dumps(lock))
    try:
        args = [*RUN, f"--workdir={workdir}"]
        rc = local.launch(args, 2, log_dir=str(tmp_path), timeout=120, cwd=str(REPO))
    except subprocess.TimeoutExpired:  # process 1 left waiting on process 0
        rc = "timeout"
    logs = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
    assert rc == 1, logs
    expected_lines = ("is in use by another run (pid 4242 on elsewhere.example", "(process 0 was refused)")
    for log, expected in zip(logs, expected_lines):
        assert "Traceback" not in log, log
        (line,) = [x for x in log.splitlines() if x.startswith("error: ")]
        assert expected in line, line
    assert json.loads((workdir / "lock.json").read_text()) == lock  # the holder's lock untouched
    assert sorted(p.name for p in workdir.iterdir()) == ["lock.json"]  # nothing written
