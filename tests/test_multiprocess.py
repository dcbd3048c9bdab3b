"""A real two-process ``jax.distributed`` run on CPU (gloo collectives).

Each process holds half of the rows of a sequence batch, passes them to
``alignjax.sharding.global_batch``, and runs a jitted sum of token log-probs (and of squared
sequence log-probs) of the tiny decoder over the global array; both processes must get the
single-process value computed here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest

REPO = Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
ROWS, T, NUM_SEQUENCES = 8, 16, 8

# Shared by the children and this process: the batch and the objective.
COMMON = textwrap.dedent(
    f"""
    import numpy as np
    import jax
    import jax.numpy as jnp

    from alignjax import logprobs as lp

    ROWS, T, NUM_SEQUENCES = {ROWS}, {T}, {NUM_SEQUENCES}


    def make_batch():
        rng = np.random.default_rng(0)
        lengths = rng.integers(6, T + 1, size=ROWS)
        t = np.arange(T)[None, :]
        valid = t < lengths[:, None]
        return dict(
            input_ids=np.where(valid, rng.integers(1, 256, size=(ROWS, T)), 0).astype(np.int32),
            positions=np.broadcast_to(t, (ROWS, T)).astype(np.int32),
            segment_ids=valid.astype(np.int32),
            loss_mask=(valid & (t >= 3)).astype(np.float32),
            example_ids=np.where(valid, np.arange(ROWS)[:, None], -1).astype(np.int32),
        )


    def objective(model):
        def fn(params, batch):
            seq, tok = lp.batch_sequence_logps(model, params, batch, NUM_SEQUENCES)
            return jnp.sum(tok), jnp.sum(seq**2)

        return jax.jit(fn)
    """
)

CHILD = COMMON + textwrap.dedent(
    """
    import json
    import sys

    from alignjax import sharding
    from alignjax.models import from_pretrained

    port, process_id, num_processes = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    assert jax.process_count() == num_processes and jax.device_count() > jax.local_device_count()
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
    batch = make_batch()
    per_process = ROWS // num_processes
    local = {k: v[process_id * per_process : (process_id + 1) * per_process] for k, v in batch.items()}
    global_batch = sharding.global_batch(mesh, local)
    assert global_batch["input_ids"].shape == (ROWS, T) and not global_batch["input_ids"].is_fully_addressable
    model = from_pretrained("tiny", mesh=mesh)
    total, squares = objective(model)(model.params, global_batch)
    print("RESULT " + json.dumps(dict(process=process_id, total=float(total), squares=float(squares))))
    sys.stdout.flush()
    jax.distributed.shutdown()
    """
)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Each child gets its own small device count (the test process's 8-device flag is dropped).
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def single_process_value():
    from alignjax.models import from_pretrained

    namespace: dict = {}
    exec(compile(COMMON, "<common>", "exec"), namespace)
    model = from_pretrained("tiny")
    batch = jax.device_put(namespace["make_batch"](), jax.devices()[0])
    total, squares = namespace["objective"](model)(model.params, batch)
    return float(total), float(squares)


def test_two_process_global_batch_matches_single_process(tmp_path, single_process_value):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(port), str(i), str(NUM_PROCESSES)],
            env=_child_env(),
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=90)
            outputs.append(out)
    finally:
        for p in procs:  # never leave a child waiting on the coordinator
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed (rc={p.returncode}):\n{out[-4000:]}"
    results = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, out[-4000:]
        results.append(json.loads(lines[0][len("RESULT ") :]))
    want_total, want_squares = single_process_value
    assert want_total < -10.0  # a real sum of log-probs
    for r in results:
        np.testing.assert_allclose(r["total"], want_total, rtol=1e-5)
        np.testing.assert_allclose(r["squares"], want_squares, rtol=1e-5)
