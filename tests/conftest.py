"""Test setup: 8 CPU devices, so every sharded code path runs on a real mesh.

XLA_FLAGS must be set before JAX is imported anywhere in the process.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One persistent XLA cache for the whole run: xdist workers, the subprocesses of the restart and
# multi-process tests, and notebook kernels compile the same tiny programs many times over.
_CACHE = os.path.join(tempfile.gettempdir(), "alignjax-test-xla-cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from alignjax import host_memory  # noqa: E402

host_memory.retain_freed_memory()  # before the first computation starts XLA's threads

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
