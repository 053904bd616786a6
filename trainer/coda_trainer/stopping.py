"""Prompt stops of long-running entry points on SIGTERM/SIGINT (the sampler server, the eval harness).

Python runs signal handlers only in the main thread, between bytecodes: a main thread inside one
long native call (an XLA compile, reading a checkpoint) sees SIGTERM only when that call returns,
and an XLA compile cannot be interrupted at all. So the slow work runs on a worker thread, the main
thread waits on it in short slices and notices a stop within `POLL_S`, and a process that is asked
to stop while native work is still in flight ends with `exit_now` (logs flushed, then `os._exit`)
instead of joining a thread that may not return for minutes. That is safe for these entry points:
they write nothing that a half-finished call could leave inconsistent (the trainer, which writes
checkpoints, has its own stop-at-a-step-boundary logic and does not use this module).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

__all__ = ["POLL_S", "StopRequest", "Stopped", "call_until_stopped", "exit_now"]

T = TypeVar("T")

POLL_S = 0.1  # how often a waiting main thread looks at the stop request

log = logging.getLogger("coda.stop")


class Stopped(Exception):
    """A stop signal arrived before the work finished."""


class StopRequest:
    """The first SIGTERM/SIGINT this process received (install() from the main thread)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> StopRequest:
        for sig in signals:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        self._event.set()

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as if `signum` had arrived (tests, embedding callers)."""
        self._handle(signum, None)

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


def call_until_stopped(fn: Callable[[], T], stop: StopRequest, *, name: str) -> T:
    """`fn()` on a daemon thread; its result (or exception), or `Stopped` as soon as `stop` is
    requested (the thread is then abandoned: it may be inside a native call that cannot end)."""
    if stop.requested:
        raise Stopped(name)
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name=name, daemon=True).start()
    while not done.wait(POLL_S):
        if stop.requested:
            raise Stopped(name)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def exit_now(code: int) -> NoReturn:
    """End the process now, without joining threads or running atexit hooks (see the module
    docstring): flush the logs and stdio first, since os._exit skips that too."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stdio
            stream.flush()
    os._exit(code)
