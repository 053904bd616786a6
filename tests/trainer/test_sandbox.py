"""The sandbox survives hostile candidates: each is scored as a failure and the harness is unharmed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from coda_trainer.evaluate.sandbox import SandboxLimits, isolation_info, run_many, run_program

FAST = SandboxLimits(timeout_s=3, cpu_s=1, memory_mb=512, max_file_mb=2)
ROOT = os.geteuid() == 0


def _leftover_sandbox_processes() -> list[str]:
    """Processes still running a sandboxed program (uid-isolated ones use uids >= 1e9)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = next(
                line
                for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("State:")
            )
        except (OSError, StopIteration):
            continue
        if (uid >= 1_000_000_000 or b"_sandbox_main" in cmd) and "Z" not in state:
            out.append(f"{pid} uid={uid} {state}")
    return out


def test_a_correct_program_passes_and_output_is_captured() -> None:
    r = run_program("import math\nprint('hello')\nassert math.sqrt(4) == 2\n", FAST)
    assert r.passed and r.status == "passed" and r.stdout.strip() == "hello"


HOSTILE = {
    "failing_assert": "assert 1 + 1 == 3",
    "infinite_loop": "while True:\n    pass",
    "sleep_forever": "import time\ntime.sleep(3600)",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "fork_bomb_that_swallows_errors": (
        "import os, time\nfor _ in range(10000):\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
        "time.sleep(3600)"
    ),
    "huge_allocation": "x = bytearray(64 * 1024**3)\nassert x",
    "growing_allocation": "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024**2))",
    "sys_exit_before_the_asserts": "import sys\nsys.exit(0)\nassert False",
    "exit_builtin": "exit()\nassert False",
    "os_exit_zero": "import os\nos._exit(0)\nassert False",
    "raise_system_exit_in_a_function": "def f():\n    raise SystemExit(0)\nf()\nassert False",
    "kill_itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "prints_megabytes": "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1024 * 1024)\nassert False",
    "writes_a_huge_file": "with open('big', 'wb') as f:\n    f.write(b'0' * 50 * 1024**2)",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
    "recursion": "def f(n):\n    return f(n + 1)\nf(0)",
    "escape_with_setsid": (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(3600)\nos._exit(0)"
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_candidates_fail_and_leave_nothing_behind(name: str) -> None:
    start = time.monotonic()
    r = run_program(HOSTILE[name], FAST)
    assert not r.passed, f"{name} passed: {r}"
    assert r.status in ("failed", "timeout", "killed", "exited_early"), r
    assert time.monotonic() - start < FAST.timeout_s + 5
    assert len(r.stdout) <= FAST.output_cap_bytes + 100
    if ROOT:
        assert _leftover_sandbox_processes() == []


def test_sys_exit_zero_is_not_a_pass_even_as_the_last_statement() -> None:
    # The harness counts a pass only if the program ran to its very end.
    assert run_program("import sys\nsys.exit(0)", FAST).status == "failed"
    assert run_program("import os\nos._exit(0)", FAST).status == "exited_early"


def test_files_outside_the_sandbox_survive(tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip(
            "file protection needs the per-sandbox uid, i.e. a harness running as root (documented)"
        )
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    os.chmod(tmp_path, 0o755)  # even where the sandbox can see the file, it must not change it
    attack = (
        "import os, shutil\n"
        f"for f in (lambda: os.remove({str(canary)!r}), lambda: shutil.rmtree({str(tmp_path)!r}),\n"
        f"          lambda: open({str(canary)!r}, 'w').write('pwned'), lambda: os.chmod({str(canary)!r}, 0)):\n"
        "    try:\n        f()\n    except OSError:\n        pass\n"
        "assert os.path.exists(os.path.expanduser('~'))\n"
        f"os.remove({str(canary)!r})\n"
    )
    r = run_program(attack, FAST)
    assert not r.passed and "PermissionError" in r.reason
    assert canary.read_text() == "alive"
    assert oct(canary.stat().st_mode & 0o777) == "0o644"


def test_cwd_and_home_are_a_fresh_private_directory() -> None:
    probe = (
        "import os, tempfile\n"
        "home = os.environ['HOME']\n"
        "assert os.getcwd() == home == tempfile.gettempdir()\n"
        "assert os.listdir(home) == []\n"
        "open('scratch.txt', 'w').write('ok')\n"
        "print(home)\n"
    )
    a, b = run_program(probe, FAST), run_program(probe, FAST)
    assert a.passed and b.passed, (a, b)
    assert a.stdout != b.stdout
    assert not os.path.exists(a.stdout.strip()), "the sandbox directory is removed afterwards"


def test_network_namespace_where_the_os_allows() -> None:
    info = isolation_info()
    if not info.network_isolated:
        pytest.skip(
            "this OS refuses a new network namespace; only the audit-hook guard applies (documented)"
        )
    # Inside a fresh network namespace only a (down) loopback interface exists.
    r = run_program("import socket\nassert [n for _, n in socket.if_nameindex()] == ['lo']", FAST)
    assert r.passed and r.network_isolated, r


def test_rlimit_nproc_stops_a_fork_bomb_quickly() -> None:
    if not ROOT:
        pytest.skip("RLIMIT_NPROC per sandbox needs the per-sandbox uid (root harness)")
    r = run_program("import os\nwhile True:\n    os.fork()", FAST)
    assert r.status == "failed" and "Resource temporarily unavailable" in r.stderr
    assert r.duration_s < 3


def test_many_sandboxes_in_parallel_keep_their_results_apart() -> None:
    programs = [f"assert {i} % 2 == 0" if i % 8 else "while True: pass" for i in range(24)]
    results = run_many(programs, SandboxLimits(timeout_s=3, cpu_s=1), workers=6)
    for i, r in enumerate(results):
        assert r.passed == (i % 8 != 0 and i % 2 == 0), (i, r)
