"""Dynamic batching: requests queue up, compatible ones leave together as one model call.

Each queued item carries a hashable `key` (kind of call, sampling settings, shape bucket); only
items with equal keys share a batch. The worker takes the oldest item, waits until its group holds
`max_batch` items or the oldest has waited `max_wait_s`, then runs one call for the group (FIFO
within the group; other groups keep their place). Calls run one at a time on a single worker
thread (the accelerator runs one program at a time anyway), so the event loop stays free to accept
and validate requests while a batch runs. A call that raises fails only the requests in its batch.

Stopping: `close()` refuses new work (ShuttingDown) while queued work keeps draining;
`abort_pending()` fails every request still waiting, in the queue or in the running batch, so its
caller can answer at once; `stop()` does both and lets the worker thread go without joining it. A
model call cannot be interrupted, so `model_busy` tells the process whether one is still running
(and must be abandoned) when it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

__all__ = ["BatchRunner", "DynamicBatcher", "QueueFull", "ShuttingDown"]

P = TypeVar("P")  # payload of one row
R = TypeVar("R")  # result of one row

# (key, payloads) -> one result per payload, in order. Runs on the worker thread.
BatchRunner = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFull(RuntimeError):
    """The queue is at capacity; the caller should retry later (HTTP 503)."""


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no new work (HTTP 503)."""


@dataclasses.dataclass
class _Item(Generic[P]):
    key: Hashable
    payload: P
    future: asyncio.Future
    enqueued: float


class DynamicBatcher(Generic[P, R]):
    def __init__(
        self,
        run_batch: BatchRunner,
        *,
        max_batch: int = 8,
        max_wait_s: float = 0.01,
        max_queue: int = 1024,
        on_queue_depth: Callable[[int], None] = lambda n: None,
        on_batch: Callable[[Hashable, int, float], None] = lambda key, size, seconds: None,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_queue_depth = on_queue_depth
        self._on_batch = on_batch
        self._queue: list[_Item] = []
        self._changed: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coda-batch")
        self._closing = False
        self._running: list[_Item] = []  # the batch on the model thread now
        self._model_busy = False  # written by the model thread only

    # ---- lifecycle ----

    async def start(self) -> None:
        self._changed = asyncio.Event()
        self._worker = asyncio.create_task(self._loop(), name="coda-batcher")

    def _on_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._model_busy = True
        try:
            return fn(*args)
        finally:
            self._model_busy = False

    @property
    def model_busy(self) -> bool:
        """Whether a call (batch or `run_exclusive`) is running on the model thread right now."""
        return self._model_busy

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the model thread (e.g. warm-up compiles), serialized with batches."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._on_model_thread, fn
        )

    def close(self) -> None:
        """Take no new work; what is queued or running still completes."""
        self._closing = True

    def abort_pending(self, error: Exception) -> int:
        """Fail every request still waiting (queued or in the running batch) with `error`; the
        running model call itself goes on, its results are dropped. Returns how many failed."""
        failed = 0
        for item in [*self._running, *self._queue]:
            if not item.future.done():
                item.future.set_exception(error)
                failed += 1
        self._queue.clear()
        self._on_queue_depth(0)
        return failed

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking work; let queued items finish for up to `drain_timeout_s`, fail the rest.
        Does not wait for a model call still running (see `model_busy`)."""
        self.close()
        deadline = time.monotonic() + drain_timeout_s
        while (self._queue or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # Fail what is left before cancelling the worker: its running batch's requests must not
        # be left waiting on a result that will never be delivered.
        self.abort_pending(ShuttingDown("server is shutting down"))
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # ---- submitting ----

    def check_room(self, rows: int) -> None:
        """Raise QueueFull unless `rows` more items fit the queue now (a request's rows are
        queued all together or not at all)."""
        if self._closing:
            raise ShuttingDown("server is shutting down")
        if len(self._queue) + rows > self.max_queue:
            raise QueueFull(
                f"queue is full ({len(self._queue)} of {self.max_queue} rows queued, this "
                f"request needs {rows}); retry later"
            )

    async def submit(self, key: Hashable, payload: P) -> R:
        if self._closing:
            raise ShuttingDown("server is shutting down")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} requests); retry later")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(key, payload, future, time.monotonic()))
        self._on_queue_depth(len(self._queue))
        assert self._changed is not None, "DynamicBatcher.start() was not awaited"
        self._changed.set()
        return await future

    # ---- worker ----

    def _group(self, key: Hashable) -> list[_Item]:
        return [it for it in self._queue if it.key == key and not it.future.done()]

    async def _loop(self) -> None:
        assert self._changed is not None
        loop = asyncio.get_running_loop()
        while True:
            # Requests whose caller went away (cancelled futures) never reach the model.
            self._queue = [it for it in self._queue if not it.future.done()]
            self._on_queue_depth(len(self._queue))
            if not self._queue:
                self._changed.clear()
                await self._changed.wait()
                continue
            oldest = self._queue[0]
            deadline = oldest.enqueued + self.max_wait_s
            while (
                len(self._group(oldest.key)) < self.max_batch
                and (left := deadline - time.monotonic()) > 0
            ):
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=left)
                except TimeoutError:
                    break
            batch = self._group(oldest.key)[: self.max_batch]
            if not batch:
                continue
            taken = {id(it) for it in batch}
            self._queue = [it for it in self._queue if id(it) not in taken]
            self._on_queue_depth(len(self._queue))
            start = time.monotonic()
            self._running = batch
            try:
                results = await loop.run_in_executor(
                    self._executor, self._on_model_thread, self._run_batch, oldest.key,
                    [it.payload for it in batch],
                )  # fmt: skip
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"batch runner returned {len(results)} results for {len(batch)} rows"
                    )
            except Exception as e:  # one bad batch fails its own requests, never the server
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            finally:
                self._running = []
                self._on_batch(oldest.key, len(batch), time.monotonic() - start)
            for it, result in zip(batch, results, strict=True):
                if not it.future.done():
                    it.future.set_result(result)
