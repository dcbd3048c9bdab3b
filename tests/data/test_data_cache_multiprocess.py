"""Two real ``jax.distributed`` processes build the tokenized cache together (each its own byte
range, a barrier between build and read) and get the batches one process computes for each of them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import portpicker

from alignjax.data import PreferenceData
from tests.data import tokenizer_zoo
from tests.data.test_data_cache import KW, rows, write_jsonl

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import jax
    from alignjax import sharding
    from alignjax.data import PreferenceData

    port, pid, data, tok, cache_dir, out, kw = sys.argv[1:]
    sharding.initialize_distributed(f"127.0.0.1:{port}", 2, int(pid))
    d = PreferenceData(data, tok, cache_dir=cache_dir, **json.loads(kw))
    np.savez(out, **{f"{i}/{k}": v for i in range(3) for k, v in next(d).items()})
    print("STATS " + json.dumps(d.stats.summary()))
    jax.distributed.shutdown()
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=1".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_two_processes_build_the_cache_once_and_match_one_process(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows(60))
    tok = tokenizer_zoo.save("llama3", str(tmp_path / "tok"))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    port = portpicker.pick_unused_port()
    kw = json.dumps(KW)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(port),
                str(p),
                data,
                tok,
                str(tmp_path / "c"),
                str(tmp_path / f"{p}.npz"),
                kw,
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    (key,) = [d for d in os.listdir(tmp_path / "c") if d != "sources"]
    assert sorted(os.listdir(tmp_path / "c" / key)) == [
        "index.json",
        "shard-00000-of-00002",
        "shard-00001-of-00002",
    ]
    for p, out in enumerate(outs):
        ref = PreferenceData(data, tok, process_count=2, process_index=p, **KW)
        want = {f"{i}/{k}": v for i in range(3) for k, v in next(ref).items()}
        got = np.load(tmp_path / f"{p}.npz")
        assert sorted(got.files) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        (line,) = [x for x in out.splitlines() if x.startswith("STATS ")]
        assert json.loads(line[6:]) == ref.stats.summary()
