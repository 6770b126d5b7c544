"""MicroBatcher: coalescing, routing, waiting, failures and cancellation (no torch needed)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from genagent import ConfigurationError
from genagent.tools import MicroBatcher


class Recorder:
    """A process function that records its batches and doubles each number."""

    def __init__(self, delay_s: float = 0.0, fail_on: set[int] | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail_on = fail_on or set()

    def __call__(self, requests: list[Any]) -> list[Any]:
        self.batches.append(list(requests))
        self.threads.add(threading.current_thread().name)
        if any(self._value(r) in self.fail_on for r in requests):
            raise ValueError(f"cannot process {requests}")
        time.sleep(self.delay_s)
        return [self._value(r) * 2 for r in requests]

    @staticmethod
    def _value(request: Any) -> int:
        return int(request[1]) if isinstance(request, tuple) else int(request)


def test_concurrent_requests_share_one_batch_and_get_their_own_results() -> None:
    process = Recorder()
    batcher = MicroBatcher(process, key=lambda r: 0, max_batch_size=8, max_wait_s=0.2)

    async def main() -> list[int]:
        return await asyncio.gather(*(batcher.asubmit(i) for i in range(5)))

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]
    assert process.batches == [[0, 1, 2, 3, 4]]
    assert process.threads == {batcher.name}  # only the worker thread touches the model
    assert batcher.stats.batches == 1 and batcher.stats.largest_batch == 5
    batcher.close()


def test_only_requests_with_equal_keys_share_a_batch() -> None:
    process = Recorder()
    batcher = MicroBatcher(process, key=lambda r: r[0], max_batch_size=8, max_wait_s=0.2)

    async def main() -> list[int]:
        requests = [("64px", 1), ("32px", 2), ("64px", 3), ("32px", 4)]
        return await asyncio.gather(*(batcher.asubmit(r) for r in requests))

    assert asyncio.run(main()) == [2, 4, 6, 8]
    assert sorted(process.batches) == [[("32px", 2), ("32px", 4)], [("64px", 1), ("64px", 3)]]
    batcher.close()


def test_a_full_batch_starts_without_waiting_and_sizes_are_respected() -> None:
    process = Recorder()
    batcher = MicroBatcher(
        process, key=lambda r: 0, size=lambda r: r, max_batch_size=4, max_wait_s=30.0
    )
    start = time.monotonic()
    futures = [batcher.submit(n) for n in (2, 2, 3, 1)]
    assert [f.result(timeout=10) for f in futures] == [4, 4, 6, 2]
    assert time.monotonic() - start < 10  # never waited the 30 s
    assert [sum(batch) for batch in process.batches] == [4, 4]  # (2, 2) then (3, 1)
    batcher.close()


def test_a_lone_request_waits_at_most_max_wait() -> None:
    batcher = MicroBatcher(Recorder(), key=lambda r: 0, max_batch_size=8, max_wait_s=0.05)
    start = time.monotonic()
    assert batcher.submit(3).result(timeout=5) == 6
    assert time.monotonic() - start < 2
    batcher.close()


def test_requests_from_many_threads_are_routed_back_correctly() -> None:
    process = Recorder(delay_s=0.01)
    batcher = MicroBatcher(process, key=lambda r: r % 2, max_batch_size=4, max_wait_s=0.01)
    results: dict[int, int] = {}

    def worker(n: int) -> None:
        results[n] = batcher.submit(n).result(timeout=10)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {n: 2 * n for n in range(40)}
    assert all(len({r % 2 for r in batch}) == 1 for batch in process.batches)
    assert max(len(batch) for batch in process.batches) <= 4
    assert len(process.batches) < 40  # some coalescing happened
    batcher.close()


def test_a_failing_batch_is_retried_alone_so_only_the_bad_request_fails() -> None:
    process = Recorder(fail_on={3})
    batcher = MicroBatcher(process, key=lambda r: 0, max_batch_size=8, max_wait_s=0.2)

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(batcher.asubmit(i) for i in (1, 3, 5)), return_exceptions=True
        )

    one, three, five = asyncio.run(main())
    assert (one, five) == (2, 10)
    assert isinstance(three, ValueError)
    assert batcher.stats.split_retries == 1
    assert process.batches[0] == [1, 3, 5] and [1] in process.batches and [5] in process.batches
    batcher.close()


def test_an_exception_returned_for_one_request_fails_only_that_request() -> None:
    def process(requests: list[int]) -> list[Any]:
        return [KeyError(r) if r == 2 else r for r in requests]

    batcher = MicroBatcher(process, key=lambda r: 0, max_wait_s=0.1)
    futures = [batcher.submit(i) for i in (1, 2)]
    assert futures[0].result(timeout=5) == 1
    with pytest.raises(KeyError):
        futures[1].result(timeout=5)
    batcher.close()


def test_a_request_cancelled_before_its_batch_is_never_processed() -> None:
    gate = threading.Event()
    seen: list[int] = []

    def process(requests: list[int]) -> list[int]:
        gate.wait(5)
        seen.extend(requests)
        return requests

    batcher = MicroBatcher(process, key=lambda r: r, max_batch_size=1, max_wait_s=0.0)
    first = batcher.submit(1)  # occupies the worker until the gate opens
    time.sleep(0.05)
    second = batcher.submit(2)
    assert second.cancel()
    gate.set()
    assert first.result(timeout=5) == 1
    batcher.close(timeout_s=5)
    assert seen == [1]


def test_a_cancelled_task_drops_its_queued_request() -> None:
    gate = threading.Event()
    seen: list[int] = []

    def process(requests: list[int]) -> list[int]:
        gate.wait(5)
        seen.extend(requests)
        return requests

    batcher = MicroBatcher(process, key=lambda r: r, max_batch_size=1, max_wait_s=0.0)

    async def main() -> None:
        busy = asyncio.ensure_future(batcher.asubmit(1))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.asubmit(2))
        await asyncio.sleep(0.05)
        queued.cancel()
        await asyncio.sleep(0.01)
        gate.set()
        assert await busy == 1

    asyncio.run(main())
    batcher.close(timeout_s=5)
    assert seen == [1]


def test_bad_settings_and_a_closed_batcher_are_clear_errors() -> None:
    with pytest.raises(ConfigurationError, match="max_batch_size"):
        MicroBatcher(Recorder(), key=lambda r: 0, max_batch_size=0)
    with pytest.raises(ConfigurationError, match="max_wait_s"):
        MicroBatcher(Recorder(), key=lambda r: 0, max_wait_s=-1)
    batcher = MicroBatcher(Recorder(), key=lambda r: 0)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)


def test_close_finishes_queued_requests() -> None:
    batcher = MicroBatcher(Recorder(delay_s=0.02), key=lambda r: r, max_wait_s=0.0)
    futures = [batcher.submit(i) for i in range(5)]
    batcher.close(timeout_s=10)
    assert [f.result(timeout=0) for f in futures] == [0, 2, 4, 6, 8]


def test_keys_that_cannot_be_compared_never_break_the_worker() -> None:
    np = pytest.importorskip("numpy")
    batcher = MicroBatcher(Recorder(), key=lambda r: np.array([r, 1.0]), max_wait_s=0.05)
    futures = [batcher.submit(i) for i in (1, 2)]  # `key_a != key_b` would raise here
    assert [f.result(timeout=5) for f in futures] == [2, 4]
    batcher.close()


def test_a_failed_worker_fails_its_queue_and_the_next_request_starts_a_new_one() -> None:
    batcher = MicroBatcher(Recorder(), key=lambda r: 0, max_wait_s=0.0)
    real = batcher._next_batch
    calls = {"n": 0}

    def broken_once() -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("scheduler bug")
        return real()

    batcher._next_batch = broken_once  # type: ignore[method-assign]
    first = batcher.submit(1)
    with pytest.raises(RuntimeError, match="worker thread failed"):
        first.result(timeout=5)
    assert batcher.submit(2).result(timeout=5) == 4  # served by a fresh worker
    batcher.close()
