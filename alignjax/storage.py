"""Workdir storage: one path type, ``etils.epath.Path``, for local directories and object stores
(``gs://``, ``s3://``), so every file a run writes lands where ``--workdir`` points.

Use epath's own API (``path(p) / "name"``, ``.exists()``, ``.read_text()``, ``.mkdir()``); the
helpers here cover the two things object stores do differently: there is no append (an object is
uploaded whole) and no atomic rename, but an upload is all-or-nothing, so a reader never sees half
a file. Locally, writes go through a temporary file and ``os.replace`` for the same guarantee.

gs:// goes through gcsfs (the ``gcs`` extra), the client that honours ``STORAGE_EMULATOR_HOST``;
orbax's array writes go through tensorstore (``TENSORSTORE_GCS_HTTP_URL`` for an emulator).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

# epath would send gs:// through TensorFlow's file layer whenever TensorFlow is importable: an
# 8 s import on start-up, and a second GCS client that ignores STORAGE_EMULATOR_HOST. Read lazily
# (at the first gs:// path), so setting it here, before any path is used, is enough.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402

PathLike = str | os.PathLike


def is_local(p: PathLike) -> bool:
    """True for a path on this machine's file system, False for ``scheme://`` object-store URLs."""
    return "://" not in os.fspath(p)


def path(p: PathLike) -> epath.Path:
    """``p`` as an ``epath.Path``; local paths are made absolute (orbax requires absolute paths)."""
    return epath.Path(os.path.abspath(p) if is_local(p) else p)


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``p`` so that readers see the old file or the new one, never a part."""
    target = path(p)
    if not is_local(target):
        target.write_bytes(data)  # an object upload is atomic
        return
    tmp = target.parent / f".{target.name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, target)


def write_text(p: PathLike, text: str) -> None:
    """:func:`write_bytes` of UTF-8 text."""
    write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written whole (:func:`write_bytes`)."""
    write_text(p, json.dumps(obj, indent=2, sort_keys=True))


def read_json(p: PathLike) -> Any:
    return json.loads(path(p).read_text())


def _gcs_blob(p: PathLike) -> Any:
    from google.cloud import storage as gcs  # the `gcs` extra; honours STORAGE_EMULATOR_HOST

    bucket, _, name = os.fspath(p).removeprefix("gs://").partition("/")
    return gcs.Client().bucket(bucket).blob(name)


def create_exclusive(p: PathLike, text: str) -> bool:
    """Creates ``p`` holding ``text`` only if it does not exist; False when it does. Atomic locally
    (``O_EXCL``) and on gs:// (an upload with the precondition "no live generation")."""
    target = path(p)
    if is_local(target):
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    if os.fspath(target).startswith("gs://"):
        from google.api_core.exceptions import PreconditionFailed

        try:
            _gcs_blob(target).upload_from_string(text, if_generation_match=0)
        except PreconditionFailed:
            return False
        return True
    if target.exists():  # other object stores: no precondition available here, best effort
        return False
    target.write_text(text)
    return True


def remove_if(p: PathLike, text: str) -> None:
    """Deletes ``p`` if it still holds ``text`` (a lock this process took, or the stale one it read),
    so that a lock someone else took in between survives; on gs:// the delete is conditional on the
    generation that was read."""
    target = path(p)
    if os.fspath(target).startswith("gs://"):
        from google.api_core.exceptions import NotFound, PreconditionFailed

        blob = _gcs_blob(target)
        try:
            blob.reload()
            if blob.download_as_text(if_generation_match=blob.generation) == text:
                blob.delete(if_generation_match=blob.generation)
        except (NotFound, PreconditionFailed):
            pass
        return
    try:
        if target.read_text() == text:
            target.unlink()
    except FileNotFoundError:
        pass


def move(src: PathLike, dst: PathLike) -> None:
    """Moves a file or directory tree (an object store has no rename: copy, then delete)."""
    source, target = path(src), path(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_local(source):
        os.replace(source, target)
        return
    import fsspec

    fs, _ = fsspec.core.url_to_fs(os.fspath(source))
    fs.mv(os.fspath(source), os.fspath(target), recursive=True)


def free_bytes(p: PathLike) -> int | None:
    """Free bytes on the file system holding ``p`` (its nearest existing parent); None for an
    object store, which has no such limit to check."""
    if not is_local(p):
        return None
    import shutil

    target = path(p)
    while not target.exists() and target != target.parent:
        target = target.parent
    return shutil.disk_usage(str(target)).free


def check_writable(p: PathLike) -> None:
    """Writes and deletes a probe object under ``p`` (created if absent); raises ``OSError`` naming
    ``p`` when that fails (no credentials, no such bucket, no permission)."""
    probe = path(p) / f".alignjax-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        path(p).mkdir(parents=True, exist_ok=True)
        probe.write_text("probe")
        probe.unlink()
    except Exception as e:  # the object store clients raise their own types
        raise OSError(
            f"{os.fspath(p)} is not writable from {socket.gethostname()}: {type(e).__name__}: {e}"
        ) from e


def main(argv: list[str]) -> int:
    """``python -m alignjax.storage check DIR`` (writable?) | ``copy SRC DST`` (one file, any stores):
    what launch/tpu_vm.sh runs on the workers, with the same clients as the run."""
    if len(argv) == 2 and argv[0] == "check":
        check_writable(argv[1])
        print(f"ok: {argv[1]} is writable")
    elif len(argv) == 3 and argv[0] == "copy":
        path(argv[2]).parent.mkdir(parents=True, exist_ok=True)
        write_bytes(argv[2], path(argv[1]).read_bytes())
    else:
        print("usage: python -m alignjax.storage check DIR | copy SRC DST", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except OSError as e:
        sys.exit(f"error: {e}")
