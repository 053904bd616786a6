"""pytest fixtures: a real GCS endpoint on loopback (`gcp-storage-emulator` in a subprocess).

- `gcs_emulator` (session): starts `gcp-storage-emulator start --in-memory` (through
  gcs_emulator_server.py, which keeps each write O(1)) on a free 127.0.0.1 port, its output going
  to a log file (a pipe nobody reads fills up after ~64 KB of the emulator's tracebacks and then
  blocks every request: the suite hung that way once), waits until it answers, and points the
  clients at it for the whole process and its children: `STORAGE_EMULATOR_HOST`
  (google-cloud-storage, gcsfs) and `TENSORSTORE_GCS_HTTP_URL` (tensorstore, i.e. orbax's array
  writes; without it saves try the real GCS and hang). Stopped and the environment restored at the
  end of the session.
- `gcs_bucket`: a fresh, empty bucket for one test, as `"gs://<name>"`.

Reuse from another test directory by importing both fixtures into that directory's conftest.py.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["GCSEmulator", "gcs_bucket", "gcs_emulator", "start_gcs_emulator"]

_ENV_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_CLOUD_PROJECT")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable() -> list[str]:
    """The emulator through gcs_emulator_server.py (same server, without the per-write snapshot
    that makes every write cost O(objects held))."""
    if importlib.util.find_spec("gcp_storage_emulator") is None:
        raise RuntimeError(
            "gcp-storage-emulator is not installed (pip install gcp-storage-emulator)"
        )
    return [sys.executable, str(Path(__file__).with_name("gcs_emulator_server.py"))]


@dataclass
class GCSEmulator:
    url: str
    process: subprocess.Popen
    log_path: Path

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket and return its `gs://` URI."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        name = name or f"test-{uuid.uuid4().hex[:12]}"
        client = storage.Client(project="test", credentials=AnonymousCredentials())
        client.create_bucket(name)
        return f"gs://{name}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _reset_gcsfs() -> None:
    """gcsfs caches file-system instances (and their endpoint): drop them after env changes."""
    try:
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
    except ImportError:
        pass


def start_gcs_emulator(timeout: float = 30.0) -> GCSEmulator:
    """Start the emulator and set the environment variables; the caller must `stop()` it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_fd, log_name = tempfile.mkstemp(prefix="gcs-emulator-", suffix=".log")
    log_path = Path(log_name)
    proc = subprocess.Popen(
        [
            *_executable(),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "--quiet",
        ],
        stdout=log_fd,
        stderr=subprocess.STDOUT,
    )
    os.close(log_fd)  # the child holds its own copy
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"gcp-storage-emulator exited with {proc.returncode}: {err}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b?project=test", timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(timeout=10)
                raise RuntimeError(
                    f"gcp-storage-emulator did not answer on {url} within {timeout}s "
                    f"(log: {log_path})"
                ) from None
            time.sleep(0.1)
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    os.environ["GOOGLE_CLOUD_PROJECT"] = "test"
    _reset_gcsfs()
    return GCSEmulator(url, proc, log_path)


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GCSEmulator]:
    saved = {k: os.environ.get(k) for k in _ENV_VARS}
    emulator = start_gcs_emulator()
    try:
        yield emulator
    finally:
        emulator.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reset_gcsfs()


@pytest.fixture
def gcs_bucket(gcs_emulator: GCSEmulator) -> str:
    return gcs_emulator.make_bucket()
