"""One file-system view over local paths and `gs://` URIs.

Everything that reads or writes outside the process (data, tokenizers, Hugging Face folders, final
checkpoints) goes through here, so local runs and GKE runs share one code path. `gs://` is served by
gcsfs, which honours `STORAGE_EMULATOR_HOST` (tests point it at gcp-storage-emulator on loopback).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec

__all__ = [
    "atomic_publish",
    "exists",
    "filesystem",
    "glob",
    "is_committed",
    "is_remote",
    "join",
    "listdir",
    "makedirs",
    "open_file",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
]


def is_remote(uri: str) -> bool:
    return uri.startswith("gs://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system serving `uri` and the path inside it."""
    if is_remote(uri):
        # Imported lazily: the local-only install (and the operator image) need no GCS client.
        fs, path = fsspec.core.url_to_fs(uri)
        # gcsfs caches listings for the life of the (shared) instance; other processes (a previous
        # attempt, another host, the operator) write the same bucket, so every question about what
        # exists must go to the store itself.
        fs.invalidate_cache()
        return fs, path
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _uri(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    return f"gs://{path}" if is_remote(like) and not path.startswith("gs://") else path


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under `uri`, sorted; empty if it does not exist."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob, or the path itself if it is a directory's files or a single file."""
    fs, path = filesystem(pattern)
    if any(ch in pattern for ch in "*?["):
        matches = fs.glob(path)
    elif fs.isdir(path):
        matches = [p for p in fs.find(path) if not fs.isdir(p)]
    elif fs.exists(path):
        matches = [path]
    else:
        matches = []
    return sorted(_uri(fs, m, pattern) for m in matches)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if not is_remote(uri):  # object stores have no directories
        fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def open_file(uri: str, mode: str = "rb", **kwargs: Any) -> Iterator[IO[Any]]:
    fs, path = filesystem(uri)
    if "w" in mode and not is_remote(uri):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    with fs.open(path, mode, **kwargs) as f:
        yield f


def read_bytes(uri: str) -> bytes:
    with open_file(uri, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    with open_file(uri, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def atomic_publish(staging_uri: str, final_uri: str, marker: str = "COMMITTED") -> None:
    """Make a fully written directory visible under `final_uri` as one step.

    Locally this is a rename (atomic on POSIX). Object stores have no rename, so on gs:// the files
    are copied and a marker object is written last: readers treat a directory without the marker as
    absent, which gives the same all-or-nothing view.
    """
    fs, src = filesystem(staging_uri)
    _, dst = filesystem(final_uri)
    if is_remote(final_uri):
        if fs.exists(dst):
            fs.rm(dst, recursive=True)
        fs.copy(src, dst, recursive=True)
        with fs.open(posixpath.join(dst, marker), "wb") as f:
            f.write(b"ok\n")
        fs.rm(src, recursive=True)
        return
    with open(os.path.join(src, marker), "wb") as f:
        f.write(b"ok\n")
    if os.path.exists(dst):
        # Move the old copy aside first so the final path is never missing a complete version.
        old = f"{dst}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
        os.rename(src, dst)
        fs.rm(old, recursive=True)
    else:
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        os.rename(src, dst)


def is_committed(uri: str, marker: str = "COMMITTED") -> bool:
    return exists(join(uri, marker))
