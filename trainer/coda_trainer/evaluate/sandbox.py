"""Execute untrusted candidate programs in a separate, resource-limited process.

Every candidate runs in its own `python -I` process with:
- a fresh temporary directory as cwd, HOME and TMPDIR, removed afterwards;
- rlimits on CPU time, address space, processes/threads, file size (which also caps captured
  stdout/stderr: they go to files, a write past the cap kills the process with SIGXFSZ), open files;
  no core dumps;
- a wall-clock timeout after which its whole process group is killed;
- no network where the OS allows it: a fresh network namespace (`unshare(CLONE_NEWNET)`, which needs
  root or unprivileged user namespaces) has no interface but a downed loopback; independently, a
  Python audit hook refuses socket connect/bind/send/getaddrinfo (defence in depth only: ctypes
  could bypass it);
- when the harness runs as root: the candidate drops to a uid of its own (one per concurrent
  sandbox), so RLIMIT_NPROC is enforced (the kernel exempts uid 0 from it), files outside its
  directory cannot be modified, and after it ends every process of that uid is killed, including
  children that escaped the process group with setsid. It keeps one capability,
  CAP_DAC_READ_SEARCH, because the Python installation may live under a 0700 directory (/root);
  that lets it read, never write, files it does not own. NO_NEW_PRIVS forbids regaining privileges
  through setuid binaries.
  As non-root the candidate runs under the harness's own uid: RLIMIT_NPROC counts all of that
  user's processes (the limit is set to the current count plus the budget), and files the user
  owns are not protected. `SandboxInfo.uid_isolated` says which case applies.

A pass requires reaching the end of the program: the harness hands the process a random nonce
and counts a pass only if the nonce comes back on a private pipe after the whole program ran
without an exception. `sys.exit(0)`, `os._exit(0)`, `exit()` or a clean return code before the
tests therefore score as failures. (A candidate that deliberately introspects the harness's
frames could find the nonce; the design targets model mistakes, not a determined adversary.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

__all__ = [
    "ExecResult",
    "SandboxAborted",
    "SandboxLimits",
    "abort_all",
    "isolation_info",
    "kill_live",
    "run_many",
    "run_program",
]

# `generation_error` is the harness's, never the sandbox's: no program ran (see runner).
Status = Literal[
    "passed", "failed", "timeout", "killed", "exited_early", "error", "generation_error"
]


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, includes interpreter start-up
    cpu_s: int = 10  # RLIMIT_CPU (soft; SIGKILL one second later)
    memory_mb: int = 1024  # RLIMIT_AS
    max_processes: int = 32  # RLIMIT_NPROC: processes + threads of the sandbox uid
    max_file_mb: int = 8  # RLIMIT_FSIZE: any file written, including captured stdout/stderr
    max_open_files: int = 128
    output_cap_bytes: int = 16 * 1024  # how much of stdout/stderr the result keeps
    isolate_network: bool = True


@dataclasses.dataclass(frozen=True)
class ExecResult:
    status: Status
    reason: str
    returncode: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    network_isolated: bool = False
    uid_isolated: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The code the sandboxed interpreter runs. It reads its configuration and the program from stdin,
# locks itself down (namespace, rlimits, uid), then executes the program. Everything lives in a
# function so the nonce is not a global the candidate could import from __main__.
_WRAPPER = r"""
def _sandbox_main():
    import ctypes, json, os, resource, sys
    cfg = json.loads(sys.stdin.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.dont_write_bytecode = True
    libc = ctypes.CDLL(None, use_errno=True)
    is_root = os.geteuid() == 0
    net = False
    if cfg["isolate_network"]:
        CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
        net = libc.unshare(CLONE_NEWNET if is_root else CLONE_NEWNET | CLONE_NEWUSER) == 0
    MB = 1 << 20
    def cap(res, soft, hard=None):
        resource.setrlimit(res, (soft, soft if hard is None else hard))
    cap(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)
    cap(resource.RLIMIT_AS, cfg["memory_mb"] * MB)
    cap(resource.RLIMIT_FSIZE, cfg["max_file_mb"] * MB)
    cap(resource.RLIMIT_NOFILE, cfg["max_open_files"])
    cap(resource.RLIMIT_CORE, 0)
    uid = cfg["uid"]
    if uid is not None and is_root:
        cap(resource.RLIMIT_NPROC, cfg["max_processes"])
        PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS = 8, 38
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl failed")
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]
        CAP_DAC_READ_SEARCH = 2
        data = (Data * 2)()
        data[0].effective = data[0].permitted = 1 << CAP_DAC_READ_SEARCH
        if libc.capset(ctypes.byref(Header(0x20080522, 0)), data):
            raise OSError(ctypes.get_errno(), "capset failed")
    else:
        mine = 0
        me = os.getuid()
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    mine += len(os.listdir(f"/proc/{pid}/task")) if os.stat(f"/proc/{pid}").st_uid == me else 0
                except OSError:
                    pass
        cap(resource.RLIMIT_NPROC, mine + cfg["max_processes"])
    blocked = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
               "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"}
    def audit(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
    sys.addaudithook(audit)
    nonce, result_fd, source = cfg["nonce"].encode(), cfg["result_fd"], cfg["source"]
    # Header on the private pipe: whether the network namespace took effect.
    os.write(result_fd, b"net=1;" if net else b"net=0;")
    del cfg, libc
    code = compile(source, "candidate.py", "exec")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, namespace)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(result_fd, nonce)
    os._exit(0)
_sandbox_main()
"""


# --------------------------------------------------------------------------------------------------
# Per-sandbox uids (root only)
# --------------------------------------------------------------------------------------------------

# A block of uids no real account uses, distinct per harness process, so that two harnesses on one
# machine never sweep each other's sandboxes. Uids rotate through the block instead of being reused
# at once: killed processes may linger as zombies (counted by RLIMIT_NPROC) until init reaps them.
_UID_BLOCK = 2048
_UID_BASE = 1_000_000_000 + (os.getpid() % (1 << 20)) * _UID_BLOCK
_uid_lock = threading.Lock()
_uid_busy: set[int] = set()
_uid_next = 0


@contextlib.contextmanager
def _uid_slot() -> Iterator[int | None]:
    global _uid_next
    if os.geteuid() != 0:
        yield None
        return
    with _uid_lock:
        for _ in range(_UID_BLOCK):
            uid = _UID_BASE + _uid_next
            _uid_next = (_uid_next + 1) % _UID_BLOCK
            if uid not in _uid_busy and not _pids_of_uid(uid):
                break
        else:
            raise RuntimeError(f"no free sandbox uid in [{_UID_BASE}, {_UID_BASE + _UID_BLOCK})")
        _uid_busy.add(uid)
    try:
        yield uid
    finally:
        _kill_uid(uid)
        with _uid_lock:
            _uid_busy.discard(uid)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`: kill(-1) from a process running as that uid reaches them all."""
    for _ in range(3):
        if not _pids_of_uid(uid):
            return
        subprocess.run(
            ["/bin/sh", "-c", "kill -9 -1 2>/dev/null; exit 0"],
            user=uid,
            group=uid,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        time.sleep(0.01)


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
    return pids


# --------------------------------------------------------------------------------------------------
# Live candidates: none may outlive the run that started it
# --------------------------------------------------------------------------------------------------
# Each candidate runs in its own session, so neither a Ctrl-C to the harness's process group nor
# the harness's death reaches it, and a candidate asleep in `time.sleep` would run on with nobody
# left to enforce its wall-clock timeout. Live candidates are registered here and killed when the
# `run_many` that started them is interrupted, or when the harness stops (`abort_all`).


class SandboxAborted(RuntimeError):
    """The harness is stopping: no new program starts."""


_live_lock = threading.Lock()
_live: dict[int, tuple[object | None, int | None]] = {}  # pid = its process group → (owner, uid)
_aborted = False


def _register(pid: int, owner: object | None, uid: int | None) -> bool:
    """Record a live candidate; False if the harness is stopping (the caller kills it)."""
    with _live_lock:
        _live[pid] = (owner, uid)
        return not _aborted


def _unregister(pid: int) -> None:
    with _live_lock:
        _live.pop(pid, None)


def kill_live(owner: object | None = None) -> int:
    """SIGKILL the running candidates started for `owner` (None: all); returns how many."""
    with _live_lock:
        victims = [(pid, uid) for pid, (o, uid) in _live.items() if owner is None or o is owner]
    for pid, uid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if uid is not None:
            _kill_uid(uid)
    return len(victims)


def abort_all() -> int:
    """Kill every running candidate of this process and refuse new ones (the harness is exiting);
    returns how many were running."""
    global _aborted
    with _live_lock:
        _aborted = True
    return kill_live()


# --------------------------------------------------------------------------------------------------
# Running one program
# --------------------------------------------------------------------------------------------------


def _read_capped(f, cap: int) -> str:
    f.seek(0)
    data = f.read(cap + 1)
    text = data[:cap].decode("utf-8", errors="replace")
    return text + ("\n…[truncated]" if len(data) > cap else "")


def _network_probe() -> bool:
    """Whether this machine lets the sandbox create a network namespace (cached)."""
    global _NETWORK_OK
    if _NETWORK_OK is None:
        probe = run_program("pass", SandboxLimits(timeout_s=30))
        _NETWORK_OK = probe.network_isolated
    return _NETWORK_OK


_NETWORK_OK: bool | None = None


@dataclasses.dataclass(frozen=True)
class SandboxInfo:
    network_isolated: bool
    uid_isolated: bool


def isolation_info() -> SandboxInfo:
    """What isolation the sandbox achieves on this machine (for reports and tests)."""
    return SandboxInfo(network_isolated=_network_probe(), uid_isolated=os.geteuid() == 0)


def run_program(
    source: str, limits: SandboxLimits | None = None, *, owner: object | None = None
) -> ExecResult:
    """Run `source` as a Python program in a sandbox; passed only if it runs to its end.
    `owner` tags the process for `kill_live(owner)`."""
    if _aborted:
        raise SandboxAborted("the evaluation harness is stopping")
    limits = limits or SandboxLimits()
    start = time.monotonic()
    with _uid_slot() as uid:
        tmp = tempfile.mkdtemp(prefix="coda-sandbox-")
        try:
            return _run_in(tmp, uid, source, limits, start, owner)
        finally:
            if uid is not None:
                _kill_uid(uid)
            shutil.rmtree(tmp, ignore_errors=True)


def _make_home(tmp: str, uid: int | None) -> str:
    """The program's private home (and cwd, TMPDIR) inside `tmp`, owned by its uid."""
    os.chmod(tmp, 0o711)
    home = os.path.join(tmp, "home")
    os.mkdir(home, 0o700)
    if uid is not None:
        os.chown(home, uid, uid)
    return home


def _wrapper_config(
    nonce: str, result_fd: int, uid: int | None, source: str, limits: SandboxLimits
) -> dict[str, Any]:
    """What `_WRAPPER` reads on its stdin."""
    return {
        "nonce": nonce,
        "result_fd": result_fd,
        "uid": uid,
        "source": source,
        "isolate_network": limits.isolate_network,
        **{
            k: getattr(limits, k)
            for k in ("cpu_s", "memory_mb", "max_processes", "max_file_mb", "max_open_files")
        },
    }


def _feed_and_wait(
    proc: subprocess.Popen, config: dict[str, Any], limits: SandboxLimits, start: float,
    owner: object | None, uid: int | None,
) -> bool:  # fmt: skip
    """Hand the wrapper its config, wait out the time limit, then kill and reap everything the
    program started. Returns whether it timed out."""
    timed_out = False
    try:
        if not _register(proc.pid, owner, uid):
            raise SandboxAborted("the evaluation harness is stopping")
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(config).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            proc.wait(timeout=max(limits.timeout_s - (time.monotonic() - start), 0.01))
        except subprocess.TimeoutExpired:
            timed_out = True
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        _unregister(proc.pid)  # before the wait reaps it: a pid in _live is never reused
        proc.wait()
        if uid is not None:
            _kill_uid(uid)
    return timed_out


def _read_token(result_r: int) -> bytes:
    """What the wrapper wrote on its result pipe (empty if nothing), closing the pipe."""
    os.set_blocking(result_r, False)
    try:
        return os.read(result_r, 4096)
    except BlockingIOError:
        return b""
    finally:
        os.close(result_r)


def _run_in(
    tmp: str, uid: int | None, source: str, limits: SandboxLimits, start: float,
    owner: object | None,
) -> ExecResult:  # fmt: skip
    home = _make_home(tmp, uid)
    nonce = secrets.token_hex(16)
    result_r, result_w = os.pipe()
    config = _wrapper_config(nonce, result_w, uid, source, limits)
    env = {"HOME": home, "TMPDIR": home, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    with (
        open(os.path.join(tmp, "stdout"), "w+b") as out,
        open(os.path.join(tmp, "stderr"), "w+b") as err,
    ):
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _WRAPPER],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                pass_fds=(result_w,),
                cwd=home,
                env=env,
                start_new_session=True,
            )
        finally:
            os.close(result_w)
        timed_out = _feed_and_wait(proc, config, limits, start, owner, uid)
        token = _read_token(result_r)
        duration = time.monotonic() - start
        stdout = _read_capped(out, limits.output_cap_bytes)
        stderr = _read_capped(err, limits.output_cap_bytes)
    rc = proc.returncode
    reached_end = token[6:] == nonce.encode()
    status, reason = _classify(rc, timed_out, reached_end, stderr)
    return ExecResult(
        status=status,
        reason=reason,
        returncode=rc,
        duration_s=duration,
        stdout=stdout,
        stderr=stderr,
        network_isolated=token.startswith(b"net=1;"),
        uid_isolated=uid is not None,
    )


def _classify(
    rc: int | None, timed_out: bool, reached_end: bool, stderr: str
) -> tuple[Status, str]:
    if timed_out:
        return "timeout", "wall-clock timeout"
    if rc is not None and rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        why = {
            "SIGXCPU": "CPU time limit",
            "SIGXFSZ": "file/output size limit",
            "SIGKILL": "killed",
        }
        return "killed", f"{sig} ({why.get(sig, 'signal')})"
    if reached_end and rc == 0:
        return "passed", "ok"
    if rc == 0:
        return "exited_early", "exited with status 0 before the end of the tests"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {rc}"
    return "failed", last[:300]


def run_many(
    sources: Sequence[str], limits: SandboxLimits | None = None, workers: int | None = None
) -> list[ExecResult]:
    """Run programs concurrently (each in its own sandbox); results in input order."""
    workers = workers or max(2, os.cpu_count() or 2)
    owner = object()
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = [pool.submit(run_program, s, limits, owner=owner) for s in sources]
    try:
        return [f.result() for f in futures]
    except BaseException:
        # Interrupted (Ctrl-C in the calling thread) or aborted: queued programs must not start
        # and running ones must not run on to their timeouts.
        for f in futures:
            f.cancel()
        kill_live(owner)
        raise
    finally:
        pool.shutdown(wait=True)
