"""Host memory: keep the pages a CPU train step frees for the next step.

XLA:CPU allocates one temporary block per execution (0.72 GiB for the bench-7m DPO step, the logits
and their gradients among it) when the step starts and frees it when the step ends; PyTorch's CPU
allocator does the same with its activations. glibc's malloc serves a block that large from a
fresh ``mmap`` and unmaps it at ``free`` (a worker thread's arena cannot hold more than 64 MiB,
and ``M_MMAP_THRESHOLD`` cannot be raised above 32 MiB), so every step page-faults the whole block
in again and the kernel zeroes it again: on a 2-core AMD EPYC, 189k page faults and 0.39 s of
system time in a 1.6 s DPO step (docs/benchmarks.md).

:func:`retain_freed_memory` makes glibc serve every thread from the main arena's heap and never
from ``mmap``, and keep up to 2 GiB of free memory at the top of that heap: after the first few
steps (the heap grows to two or three such blocks, as a step may start before the last one freed
its own) the blocks are reused, with no page faults. What it costs: memory freed inside the heap
stays with the process (reused by later allocations, not returned to the system). It acts only on
threads that have not yet allocated, so it must run before the first JAX computation starts XLA's
threads: ``alignjax.main`` calls it first thing, the test suite in its ``conftest.py``; in a
notebook, call it before anything touches a device. ``ALIGNJAX_HOST_MALLOC=system`` leaves the
allocator as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# mallopt takes an int: the most free memory the top of the heap may keep before glibc trims it.
TRIM_THRESHOLD = 2**31 - 1


def retain_freed_memory() -> bool:
    """Sets glibc's allocator to keep freed memory (see the module docstring); ``True`` if it did.

    ``False``, changing nothing, where the C library is not glibc (macOS, musl) or
    ``ALIGNJAX_HOST_MALLOC=system`` is set.
    """
    if os.environ.get("ALIGNJAX_HOST_MALLOC", "retain") == "system" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all(mallopt(param, value) == 1 for param, value in settings)
