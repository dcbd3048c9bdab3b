"""alignjax.host_memory: the kernel's page-fault counter of a process that runs a jitted program with
a large temporary block again and again, with glibc's allocator retained and as the system leaves it.
Each case runs in its own process: the setting only acts before XLA's threads start."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from alignjax import host_memory

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The log-normaliser of one [4096, 8192] fp32 product (128 MiB, a temporary of the program, as the logits are
# in a train step); page faults of the median call after the first few.
PROGRAM = """
import json, resource
from alignjax import host_memory
applied = host_memory.retain_freed_memory()
import jax, jax.numpy as jnp
a, b = jnp.ones((4096, 64)), jnp.ones((64, 8192))
f = jax.jit(lambda a, b: jax.nn.logsumexp(a @ b, axis=-1))
temp = f.lower(a, b).compile().memory_analysis().temp_size_in_bytes
for _ in range(8):  # the heap grows to its steady state (a call may start before the last one freed)
    f(a, b).block_until_ready()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(faults)[len(faults) // 2]  # the median call: a rare call can still grow the heap
print(json.dumps(dict(applied=applied, temp=temp, faults=faults)))
"""


def run_program(malloc: str) -> dict:
    env = dict(os.environ, ALIGNJAX_HOST_MALLOC=malloc, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def thp_always() -> bool:
    path = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_retained_memory_is_not_faulted_in_again_each_call():
    retained, system = run_program("retain"), run_program("system")
    assert retained["applied"] and not system["applied"]
    pages = retained["temp"] / 4096
    assert retained["temp"] >= 128 * 2**20, retained  # the premise: a temporary past mmap's threshold
    # Retained: the block is reused, no page of it faults again (a few stray faults elsewhere).
    assert retained["faults"] < pages / 100, (retained, system)
    if not thp_always():  # with 2 MiB pages the system allocator faults 512x less often (still zeroes)
        assert system["faults"] > pages / 2, (retained, system)


def test_system_setting_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("ALIGNJAX_HOST_MALLOC", "system")
    assert host_memory.retain_freed_memory() is False
