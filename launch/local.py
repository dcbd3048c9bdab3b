"""Starts N processes of ``alignjax.main`` on this machine, joined by ``jax.distributed`` (CPU: gloo).

  python launch/local.py --num_processes=2 -- --config=experiments/dpo.py:runlocal --workdir=workdirs/mp

Each process gets ``--config.distributed.enabled=True``, the coordinator address, the process count
and its own ``process_id``; every process sees ``--devices_per_process`` CPU devices. Logs go to
``<workdir>/process_<i>.log``; the exit status is the first non-zero one.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    main_args: list[str],
    num_processes: int,
    devices_per_process: int = 1,
    log_dir: str | None = None,
    timeout: float | None = None,
    cwd: str | None = None,
) -> int:
    """Runs the processes to completion and returns the first non-zero exit status (or 0).

    ``cwd`` is where they run (relative ``--config``/``--workdir`` paths resolve there; default: here).
    After ``timeout`` seconds every process is killed and TimeoutExpired raised.
    """
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(num_processes):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        )
        cmd = [
            sys.executable,
            "-m",
            "alignjax.main",
            *main_args,
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address={address}",
            f"--config.distributed.num_processes={num_processes}",
            f"--config.distributed.process_id={i}",
        ]
        log = open(os.path.join(log_dir, f"process_{i}.log"), "w") if log_dir else None
        procs.append(
            (
                subprocess.Popen(
                    cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT if log else None
                ),
                log,
            )
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    codes = []
    try:
        for proc, _ in procs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            codes.append(proc.wait(timeout=left))
    except subprocess.TimeoutExpired:
        for proc, _ in procs:  # a process left waiting on a collective never exits by itself
            proc.kill()
            proc.wait()
        raise
    finally:
        for _, log in procs:
            if log:
                log.close()
    return next((c for c in codes if c), 0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--log_dir", default=None)
    parser.add_argument("main_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    main_args = [a for a in args.main_args if a != "--"]
    sys.exit(launch(main_args, args.num_processes, args.devices_per_process, args.log_dir))


if __name__ == "__main__":
    main()
