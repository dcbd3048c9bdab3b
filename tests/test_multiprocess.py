"""Real two-process ``jax.distributed`` runs on CPU (gloo collectives).

* Each process holds half of the rows of a sequence batch, passes them to
  ``alignjax.sharding.global_batch``, and runs a jitted sum of token log-probs (and of squared
  sequence log-probs) of the tiny decoder over the global array; both processes must get the
  single-process value computed here.
* The reference cache decides together which chunks are built: in the same children, a chunk that
  only one process has is recomputed by both (its computation is a collective), one that both have
  is skipped by both.
* The score job through ``launch/local.py`` on two processes writes the one-process scores.
* End to end through ``launch/local.py``: a cache-reference DPO run, then one process's chunk file
  deleted and a second run on the same cache: both processes recompute that chunk (bitwise the
  same files) and the second run's metrics equal the first's line by line.
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
EXPORT_SHARD = "60KB"  # several safetensors files for the tiny preset

# Shared by the children and this process: the batch and the objective.
COMMON = textwrap.dedent(
    f"""
    import numpy as np
    import jax
    import jax.numpy as jnp

    from alignjax import logprobs as lp

    ROWS, T, NUM_SEQUENCES = {ROWS}, {T}, {NUM_SEQUENCES}
    EXPORT_SHARD = "{EXPORT_SHARD}"


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

    # The HF export, every tensor gathered across the two processes (process 0 writes).
    from alignjax.models import save_pretrained

    save_pretrained(model, model.params, sys.argv[5], dtype="bfloat16", max_shard_size=EXPORT_SHARD)

    # Reference cache, 3 chunks of 2 micro-batches: chunk 0 on both processes, chunk 1 only on
    # process 0 (as a preemption between the two hosts' writes leaves it), chunk 2 on none.
    import io
    from jax.experimental import multihost_utils
    from alignjax.train.reference import ReferenceCache

    cache = ReferenceCache(sys.argv[4], "key", ("ref_chosen_logps",), chunk=2)
    cache.directory.mkdir(parents=True, exist_ok=True)
    old = np.full((2, 2), -7.0, np.float32)
    for chunk in (0, 1) if process_id == 0 else (0,):
        buf = io.BytesIO()
        np.savez(buf, ref_chosen_logps=old)
        cache._path(chunk).write_bytes(buf.getvalue())
    multihost_utils.sync_global_devices("cache files written")
    computed = []
    total_of = jax.jit(lambda x: x + jnp.sum(x), out_shardings=sharding.batch_sharding(mesh, 1))

    def compute(host):
        computed.append(int(host["index"][0]))
        x = sharding.global_batch(mesh, {"x": host["x"]})["x"]
        return {"ref_chosen_logps": total_of(x)}  # a cross-process sum: a collective

    batches = ({"index": np.full(2, i), "x": np.full(2, 10.0 * i + process_id, np.float32)} for i in range(6))
    was_complete = cache.complete(6)
    written = cache.build(batches, 6, compute)
    print("CACHE " + json.dumps(dict(
        process=process_id, was_complete=was_complete, written=written, computed=computed,
        complete=cache.complete(6), rows=[cache.lookup(i)["ref_chosen_logps"].tolist() for i in range(6)],
    )))
    sys.stdout.flush()

    # HF import over fsdp across both processes, each HF slice the loader requests counted: each
    # process should read its own HF rows only (about half the checkpoint), in both layouts.
    import hashlib
    import math
    from alignjax.models import hf

    requested = [0]
    real_read_block = hf._read_block

    class Counted:
        def __init__(self, tensor):
            self.tensor = tensor

        def __getitem__(self, index):
            block = self.tensor[index]  # counted as whole HF rows: the pages a block spans
            shape = self.tensor.get_shape()
            rows = len(range(*index[0].indices(shape[0]))) if shape else 1
            requested[0] += rows * block.itemsize * math.prod(shape[1:])
            return block

    hf._read_block = lambda tensor, m, index: real_read_block(Counted(tensor), m, index)
    fsdp = sharding.make_mesh({"fsdp": -1})
    for scan in (False, True):
        requested[0] = 0
        loaded = from_pretrained(sys.argv[6], mesh=fsdp, scan_layers=scan)
        digests = {
            jax.tree_util.keystr(path): hashlib.sha256(
                np.asarray(multihost_utils.process_allgather(x, tiled=True)).tobytes()
            ).hexdigest()
            for path, x in jax.tree_util.tree_leaves_with_path(loaded.params)
        }
        print("IMPORT " + json.dumps(dict(scan=scan, requested=requested[0], digests=digests)))
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


class _Outputs(list):
    """The children's stdout, one string each, and where they exported the model."""

    export_dir: Path


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    """A tiny Llama saved by transformers, which the children import."""
    from tests.hf_fixtures import save_llama

    path = tmp_path_factory.mktemp("llama")
    save_llama(str(path), vocab_size=64)
    return path


@pytest.fixture(scope="module")
def children(tmp_path_factory, hf_llama):
    """The two children's outputs (each: its RESULT, CACHE and IMPORT lines)."""
    tmp_path = tmp_path_factory.mktemp("children")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(port), str(i), str(NUM_PROCESSES), str(tmp_path / "cache"),
             str(tmp_path / "export"), str(hf_llama)],
            env=_child_env(),
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    outputs = _Outputs()
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
    outputs.export_dir = tmp_path / "export"
    return outputs


def _lines(outputs: list[str], tag: str, count: int = 1) -> list:
    """Each child's ``tag`` line (its ``count`` lines, as a list, where ``count`` > 1), parsed."""
    results = []
    for out in outputs:
        lines = [json.loads(line[len(tag) + 1 :]) for line in out.splitlines() if line.startswith(tag + " ")]
        assert len(lines) == count, out[-4000:]
        results.append(lines if count > 1 else lines[0])
    return results


def test_two_process_global_batch_matches_single_process(children, single_process_value):
    results = _lines(children, "RESULT")
    want_total, want_squares = single_process_value
    assert want_total < -10.0  # a real sum of log-probs
    for r in results:
        np.testing.assert_allclose(r["total"], want_total, rtol=1e-5)
        np.testing.assert_allclose(r["squares"], want_squares, rtol=1e-5)


def test_two_process_export_writes_the_single_process_files_byte_for_byte(children, tmp_path):
    from alignjax.models import from_pretrained, save_pretrained

    model = from_pretrained("tiny")
    save_pretrained(model, model.params, tmp_path, dtype="bfloat16", max_shard_size=EXPORT_SHARD)
    written = sorted(p.name for p in children.export_dir.iterdir())
    assert written == sorted(p.name for p in tmp_path.iterdir()) and len(written) > 3
    for name in written:
        assert (children.export_dir / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_two_process_import_reads_each_row_once_and_equals_the_single_process_load(children, hf_llama):
    import hashlib

    from alignjax.models import from_pretrained
    from alignjax.models.hf import open_safetensors

    with open_safetensors(str(hf_llama / "model.safetensors")) as f:
        checkpoint = sum(f.get_tensor(name).nbytes for name in f.keys())
    for scan, per_process in zip((False, True), zip(*_lines(children, "IMPORT", count=2), strict=True)):
        params = from_pretrained(str(hf_llama), scan_layers=scan).params
        want = {
            jax.tree_util.keystr(path): hashlib.sha256(np.asarray(x).tobytes()).hexdigest()
            for path, x in jax.tree_util.tree_leaves_with_path(params)
        }
        for r in per_process:
            assert r["scan"] == scan and r["digests"] == want
            assert 0 < r["requested"] <= 0.6 * checkpoint, (scan, r["requested"] / checkpoint)


def test_cache_chunks_are_skipped_or_recomputed_by_all_processes_together(children):
    results = _lines(children, "CACHE")
    for p, r in enumerate(results):
        assert r["process"] == p
        assert not r["was_complete"] and r["complete"]  # chunk 1 was on process 0 only
        assert r["written"] == 2 and r["computed"] == [2, 3, 4, 5]  # chunks 1 and 2, on both
        assert r["rows"][:2] == [[-7.0, -7.0]] * 2  # chunk 0 (on both) kept as it was
        for i in range(2, 6):  # each row + the sum of micro-batch i's 4 global rows
            total = 2 * (10.0 * i) + 2 * (10.0 * i + 1)
            assert r["rows"][i] == [10.0 * i + p + total] * 2


# A cache-reference DPO run through launch/local.py, small. Width 128, not 32: under
# logprobs.STRICT_ROUNDING XLA:CPU's legacy emitters unroll tiny loops fully, and the width-32 step
# compiled 2x slower (113 s vs 49 s per run).
RUN = [
    "--config=experiments/dpo.py:runlocal,steps=2,reference=cache",
    "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=0",
    "--config.data.max_length=10",
    "--config.data.eval_source=",
    "--config.train.progress=False",
    "--config.train.tensorboard=False",
    "--config.train.plot=False",
    "--config.model.overrides.vocab_size=16",
    "--config.model.overrides.hidden_size=128",
    "--config.model.overrides.num_layers=1",
    "--config.model.overrides.num_heads=2",
    "--config.model.overrides.num_kv_heads=2",
    "--config.model.overrides.intermediate_size=256",
]


def _launch(workdir: Path, cache_dir: Path) -> None:
    sys.path.insert(0, str(REPO / "launch"))
    import local

    workdir.mkdir()
    args = [*RUN, f"--workdir={workdir}", f"--config.reference.cache_dir={cache_dir}"]
    try:
        rc = local.launch(args, NUM_PROCESSES, log_dir=str(workdir), timeout=240, cwd=str(REPO))
    except subprocess.TimeoutExpired:  # what a process left alone in a collective does
        rc = "timeout"
    logs = "\n".join((workdir / f"process_{i}.log").read_text()[-3000:] for i in range(NUM_PROCESSES))
    assert rc == 0, f"rc={rc}:\n{logs}"


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]


def test_cache_chunk_lost_on_one_process_is_rebuilt_by_both(tmp_path):
    cache_dir = tmp_path / "cache"
    _launch(tmp_path / "undamaged", cache_dir)
    (key,) = os.listdir(cache_dir)
    files = {p: cache_dir / key / f"p{p}_c000000.npz" for p in range(NUM_PROCESSES)}
    before = {p: (f.read_bytes(), f.stat().st_ino, f.stat().st_mtime_ns) for p, f in files.items()}
    files[1].unlink()  # process 0's chunk survived, process 1's did not
    _launch(tmp_path / "rerun", cache_dir)
    assert os.listdir(cache_dir) == [key]
    for p, f in files.items():  # rewritten by both processes, bitwise as before
        data, inode, mtime = before[p]
        assert f.read_bytes() == data
        if p == 0:
            assert (f.stat().st_ino, f.stat().st_mtime_ns) != (inode, mtime)
    undamaged, rerun = _metrics(tmp_path / "undamaged"), _metrics(tmp_path / "rerun")
    assert [r["step"] for r in undamaged if "loss" in r] == [1, 2]
    assert rerun == undamaged  # every metric of every step, bit for bit


def test_two_process_scoring_equals_one_process(tmp_path):
    """The score job on two processes (each scores its share of every batch, with global sequence
    ids) writes the one-process scores: every pair's implicit reward, in order."""
    sys.path.insert(0, str(REPO / "launch"))
    import local

    from alignjax.data import synthetic

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in synthetic.records("arithmetic_dpo", "test")[:40]))
    args = [f"--config=experiments/score.py:runlocal,source={pairs},tokenization=trl",
            "--config.data.eval_batch_size=16"]
    scores = {}
    for n in (1, NUM_PROCESSES):
        workdir = tmp_path / f"p{n}"
        workdir.mkdir()
        rc = local.launch([*args, f"--workdir={workdir}"], n, devices_per_process=4 // n,
                          log_dir=str(workdir), timeout=240, cwd=str(REPO))
        logs = "\n".join((workdir / f"process_{i}.log").read_text()[-3000:] for i in range(n))
        assert rc == 0, logs
        scores[n] = [json.loads(line) for line in (workdir / "scores.jsonl").read_text().splitlines()]
    assert len(scores[1]) == 40
    # the same pairs in the same order; the values to an ulp (4 devices on one host vs 2 x 2 sum the
    # shards' token log-probs in another order)
    assert [r["subset"] for r in scores[NUM_PROCESSES]] == [r["subset"] for r in scores[1]]
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose([r[side] for r in scores[NUM_PROCESSES]], [r[side] for r in scores[1]],
                                   rtol=1e-6)
