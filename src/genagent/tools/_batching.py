"""``MicroBatcher``: coalesce compatible requests from concurrent runs into one model call.

Runs that share one local generator each submit their own request; a worker thread that owns
the model waits a moment (``max_wait_s``) for compatible requests (the same ``key``: size,
steps, guidance), runs them as one batch, and routes each result back to its caller. The
model is only ever touched by that thread, so callers may be threads or coroutines on any
event loop. The batcher is torch-free: it serves any ``process(requests) -> results``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from genagent.errors import ConfigurationError

__all__ = ["BatcherStats", "MicroBatcher"]

logger = logging.getLogger("genagent.tools.batching")

R = TypeVar("R")
T = TypeVar("T")


@dataclass
class BatcherStats:
    """Counters of a :class:`MicroBatcher` (read them while it runs; they only grow).

    Attributes:
        batches: Calls of ``process``.
        requests: Requests served (successfully or not).
        items: Items (images) in all batches.
        largest_batch: Most items in one call.
        split_retries: Batches that failed and were retried one request at a time.
    """

    batches: int = 0
    requests: int = 0
    items: int = 0
    largest_batch: int = 0
    split_retries: int = 0


@dataclass
class _Pending(Generic[R, T]):
    request: R
    key: Hashable
    size: int
    future: concurrent.futures.Future[T]
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[R, T]):
    """Serve requests in batches on one worker thread.

    Args:
        process: Runs one batch on the worker thread: takes the requests, returns one result
            per request, in order; an exception in place of a result fails only that request.
            It may raise; see ``retry_alone``.
        key: Requests with equal keys may share a batch (e.g. ``(width, height, steps)``).
        size: Items a request adds to a batch (e.g. its number of images); default 1.
        max_batch_size: Most items in one batch. A request larger than this runs alone.
        max_wait_s: Longest a request waits for company before its batch starts. A request
            that waited while the previous batch ran starts with the next one at once.
        retry_alone: When a batch of several requests fails, run each request alone, so one
            bad request (or a batch too large for memory) fails only itself.
        name: Names the worker thread and log messages.

    Example:
        ```python
        from genagent.tools import MicroBatcher

        batcher = MicroBatcher(lambda xs: [x * 2 for x in xs], key=lambda x: 0)
        assert batcher.submit(21).result() == 42
        batcher.close()
        ```
    """

    def __init__(
        self,
        process: Callable[[list[R]], Sequence[T | BaseException]],
        *,
        key: Callable[[R], Hashable],
        size: Callable[[R], int] = lambda _: 1,
        max_batch_size: int = 8,
        max_wait_s: float = 0.01,
        retry_alone: bool = True,
        name: str = "genagent-batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ConfigurationError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ConfigurationError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.process = process
        self.key = key
        self.size = size
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.retry_alone = retry_alone
        self.name = name
        self.stats = BatcherStats()
        self._pending: deque[_Pending[R, T]] = deque()
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ submitting

    def submit(self, request: R) -> concurrent.futures.Future[T]:
        """Queue a request (thread-safe); the future resolves with its result or error.

        Cancelling the future before its batch starts drops the request.
        """
        size = self.size(request)
        if size < 1:
            raise ValueError(f"a request must have a positive size, got {size}")
        pending: _Pending[R, T] = _Pending(
            request, self.key(request), size, concurrent.futures.Future()
        )
        with self._cv:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            self._pending.append(pending)
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._worker.start()
            self._cv.notify()
        return pending.future

    async def asubmit(self, request: R) -> T:
        """Queue a request and await its result (from any event loop).

        If the awaiting task is cancelled before the batch starts, the request is dropped.
        """
        future = self.submit(request)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    def close(self, timeout_s: float | None = None) -> None:
        """Stop accepting requests; the worker finishes what is queued, then exits."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout_s)

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        with self._cv:
            return len(self._pending)

    # ------------------------------------------------------------------ worker

    def _serve(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                live = [p for p in batch if p.future.set_running_or_notify_cancel()]
                if live:
                    self._run(live)
        except BaseException as exc:
            # never leave callers waiting on a dead thread: fail what is queued, and let the
            # next submit start a new worker
            logger.error("%s: the worker thread failed: %s: %s", self.name, type(exc).__name__, exc)
            with self._cv:
                pending, self._pending = list(self._pending), deque()
                self._worker = None
            for item in pending:
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(
                        RuntimeError(f"{self.name}: the worker thread failed: {exc!r}")
                    )
            if not isinstance(exc, Exception):
                raise

    def _next_batch(self) -> list[_Pending[R, T]] | None:
        with self._cv:
            while not self._pending:
                if self._closed:
                    return None
                self._cv.wait()
            first = self._pending[0]
            start_by = first.enqueued + self.max_wait_s
            while True:
                batch = self._compatible(first)
                items = sum(p.size for p in batch)
                remaining = start_by - time.monotonic()
                if items >= self.max_batch_size or remaining <= 0 or self._closed:
                    break
                self._cv.wait(remaining)
            for pending in batch:
                self._pending.remove(pending)
            return batch

    def _compatible(self, first: _Pending[R, T]) -> list[_Pending[R, T]]:
        """``first`` and the queued requests that fit beside it, in arrival order."""
        batch, items = [first], first.size
        for pending in self._pending:
            if pending is first or not _same_key(pending.key, first.key):
                continue
            if pending.future.cancelled():
                batch.append(pending)  # dropped when the batch starts; costs nothing
                continue
            if items + pending.size <= self.max_batch_size:
                batch.append(pending)
                items += pending.size
        return batch

    def _run(self, batch: list[_Pending[R, T]]) -> None:
        error: BaseException | None = None
        try:
            results = list(self._call([p.request for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: process returned {len(results)} results for "
                    f"{len(batch)} requests"
                )
        except BaseException as exc:
            error = exc
        if error is None:
            for pending, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
            self.stats.requests += len(batch)
            return
        if len(batch) > 1 and self.retry_alone and isinstance(error, Exception):
            self.stats.split_retries += 1
            logger.warning(
                "%s: a batch of %d requests failed (%s: %s); running them one at a time",
                self.name,
                len(batch),
                type(error).__name__,
                error,
            )
            # drop the error before retrying: its traceback may hold the failed batch's
            # tensors (an out-of-memory error), which the smaller calls need the memory of
            error = None
            for pending in batch:
                self._run([pending])
            return
        for pending in batch:
            pending.future.set_exception(error)
        self.stats.requests += len(batch)
        if not isinstance(error, Exception):
            raise error

    def _call(self, requests: list[R]) -> Sequence[T | BaseException]:
        items = sum(self.size(r) for r in requests)
        self.stats.batches += 1
        self.stats.items += items
        self.stats.largest_batch = max(self.stats.largest_batch, items)
        return self.process(requests)

    def __repr__(self) -> str:
        return (
            f"MicroBatcher(name={self.name!r}, max_batch_size={self.max_batch_size}, "
            f"max_wait_s={self.max_wait_s})"
        )


def _same_key(a: Hashable, b: Hashable) -> bool:
    """Key equality that never raises (a key holding an array compares ambiguously)."""
    try:
        return bool(a == b)
    except Exception:
        return False
