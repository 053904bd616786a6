"""How `coda-ctl` fails against the wrong cluster: no CRD, a server that 404s everything, a server
that accepts connections and never answers, several kubeconfig files, a failing credential plugin.

Real sockets and real processes: a kmock emulator without the CRD, an HTTP server that answers 404,
a listening socket that never replies, and the console script for what reaches a user's terminal.
"""

from __future__ import annotations

import http.server
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from coda_ctl.errors import Exit
from coda_ctl.main import app
from ctl_testkit import REPO, Emulator, write_kubeconfig
from typer.testing import CliRunner

EXAMPLE = REPO / "manifests" / "examples" / "coda-1.7b-v5p.yaml"


def _ctl(kubeconfig: Path | str, *args: str) -> object:
    return CliRunner().invoke(app, ["--kubeconfig", str(kubeconfig), *args])


# --------------------------------------------------------------------------------- no CRD


@pytest.fixture(scope="module")
def crdless_kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A kmock cluster without the CodaTrainingRun CRD, in its own process."""
    tmp = tmp_path_factory.mktemp("nocrd")
    url_file, log = tmp / "url", tmp / "emulator.log"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from ctl_testkit import serve_emulator_forever;"
        " serve_emulator_forever(sys.argv[2], crd=False)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("trainer", "operator", "cli")),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(Path(__file__).parent), str(url_file)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not url_file.exists() or not url_file.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no-CRD emulator did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield write_kubeconfig(tmp / "config", url_file.read_text())
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize(
    "verb",
    [["get"], ["get", "some-run"], ["describe", "some-run"], ["submit", "-f", str(EXAMPLE)]],
    ids=["list", "get", "describe", "submit"],
)
def test_missing_crd_is_named_as_such(crdless_kubeconfig: Path, verb: list[str]) -> None:
    res = _ctl(crdless_kubeconfig, *verb)
    assert res.exit_code == Exit.NO_CLUSTER, res.output
    assert "the CodaTrainingRun CRD (codatrainingruns.coda.dev) is not installed" in res.stderr
    assert "kubectl apply --server-side" in res.stderr and "--context" in res.stderr
    assert "not found" not in res.stderr  # not mistaken for a missing run
    assert len(res.stderr.splitlines()) == 1


def test_missing_run_is_still_not_found(kubeconfig: Path) -> None:
    """Discovery confirms the CRD is there, so a 404 means the run."""
    res = _ctl(kubeconfig, "describe", "no-such-run")
    assert res.exit_code == Exit.NOT_FOUND, res.output
    assert 'codatrainingrun "no-such-run" in namespace "ml" not found' in res.stderr


# --------------------------------------------------------------------------------- 404 server


class _NotFound(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        body = b"404 page not found\n"
        self.send_response(404)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture()
def server_404() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize("verb", [["get"], ["get", "x"], ["submit", "-f", str(EXAMPLE)]])
def test_a_server_that_404s_everything_is_not_kubernetes(
    server_404: str, tmp_path: Path, verb: list[str]
) -> None:
    kc = write_kubeconfig(tmp_path / "config", server_404)
    res = _ctl(kc, *verb)
    assert res.exit_code == Exit.NO_CLUSTER, res.output
    assert f"{server_404} does not answer like a Kubernetes API server (GET /api: 404)" in (
        res.stderr
    )
    assert "not found" not in res.stderr


# --------------------------------------------------------------------------------- hung server


@pytest.fixture()
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """Accepts every connection and never sends a byte; records the connections it got."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(10)
        for c in accepted:
            c.close()
        listener.close()


def test_a_hung_server_fails_within_the_request_timeout(
    silent_server: tuple[str, list[socket.socket]], tmp_path: Path
) -> None:
    url, accepted = silent_server
    kc = write_kubeconfig(tmp_path / "config", url)
    start = time.monotonic()
    res = CliRunner().invoke(app, ["--kubeconfig", str(kc), "--request-timeout", "1.5", "get"])
    elapsed = time.monotonic() - start
    assert res.exit_code == Exit.NO_CLUSTER, res.output
    assert f"cannot reach the API server at {url}: no answer within 1.5s" in res.stderr
    assert 1.4 < elapsed < 4.0, elapsed  # one attempt of 1.5 s, not urllib3's retries
    assert len(accepted) == 1  # exactly one connection: retries are really off


def test_the_default_request_timeout_is_stated_in_help() -> None:
    res = CliRunner().invoke(app, ["--help"])
    assert "--request-timeout" in res.stdout and "30" in res.stdout


# --------------------------------------------------------------------------------- KUBECONFIG=a:b


def _kubeconfig_doc(server: str, ctx: str, ns: str, current: str | None) -> dict[str, object]:
    doc: dict[str, object] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": f"{ctx}-cluster", "cluster": {"server": server}}],
        "users": [{"name": f"{ctx}-user", "user": {"token": "t"}}],
        "contexts": [
            {
                "name": ctx,
                "context": {"cluster": f"{ctx}-cluster", "user": f"{ctx}-user", "namespace": ns},
            }
        ],
    }
    if current:
        doc["current-context"] = current
    return doc


def test_kubeconfig_path_list_is_merged_like_kubectl(
    kubeconfig: Path, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    # a: the current context, namespace "team-a"; b: another context (namespace "team-b") and its
    # own current-context, which kubectl ignores because a set one first.
    a.write_text(yaml.safe_dump(_kubeconfig_doc(emulator.url, "ctx-a", "team-a", "ctx-a")))
    b.write_text(yaml.safe_dump(_kubeconfig_doc(emulator.url, "ctx-b", "team-b", "ctx-b")))
    missing = tmp_path / "not-there"
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(missing), str(a), str(b)]))
    res = CliRunner().invoke(app, ["get"])
    assert res.exit_code == 0, res.output
    assert 'namespace "team-a"' in res.stderr  # "No CodaTrainingRuns in namespace …"
    res = CliRunner().invoke(app, ["--context", "ctx-b", "get"])
    assert res.exit_code == 0 and 'namespace "team-b"' in res.stderr, res.output
    res = CliRunner().invoke(app, ["--context", "ctx-c", "get"])
    assert res.exit_code == Exit.NO_CLUSTER
    assert "context 'ctx-c' not found" in res.stderr and "ctx-a, ctx-b" in res.stderr


# --------------------------------------------------------------------------------- auth plugin


def _exec_kubeconfig(path: Path, server: str, command: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "gke", "cluster": {"server": server}}],
                "users": [
                    {
                        "name": "gke-user",
                        "user": {
                            "exec": {
                                "apiVersion": "client.authentication.k8s.io/v1beta1",
                                "command": command,
                                "interactiveMode": "IfAvailable",
                            }
                        },
                    }
                ],
                "contexts": [{"name": "gke", "context": {"cluster": "gke", "user": "gke-user"}}],
                "current-context": "gke",
            }
        )
    )
    return path


def _console(kc: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("coda-ctl")
    env = {**os.environ, "KUBECONFIG": str(kc)}
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_a_failing_auth_plugin_is_one_line_and_a_hint(emulator: Emulator, tmp_path: Path) -> None:
    plugin = tmp_path / "gke-gcloud-auth-plugin"
    lines = "\n".join(f"  at frame {i}" for i in range(20))
    plugin.write_text(
        "#!/bin/sh\n"
        "echo 'ERROR: gcloud credentials expired; run gcloud auth login' >&2\n"
        f"cat >&2 <<'EOF'\n{lines}\nEOF\n"
        "exit 1\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    kc = _exec_kubeconfig(tmp_path / "config", emulator.url, str(plugin))
    res = _console(kc, "get")
    assert res.returncode == Exit.NO_CLUSTER, res.stderr
    assert res.stderr.splitlines() == [
        f"error: credential plugin {str(plugin)!r} failed: process returned 1. "
        "ERROR: gcloud credentials expired; run gcloud auth login",
        "hint: `gcloud auth login` (or `gcloud components install gke-gcloud-auth-plugin`), "
        "then `gcloud container clusters get-credentials CLUSTER`",
    ]
    assert res.stdout == ""


def test_a_missing_auth_plugin_is_named(emulator: Emulator, tmp_path: Path) -> None:
    kc = _exec_kubeconfig(tmp_path / "config", emulator.url, "coda-test-no-such-plugin")
    res = _console(kc, "get")
    assert res.returncode == Exit.NO_CLUSTER, res.stderr
    assert res.stderr.splitlines() == [
        "error: credential plugin 'coda-test-no-such-plugin' is not installed or not on PATH",
        "hint: run `coda-test-no-such-plugin` yourself to see its whole output",
    ]
