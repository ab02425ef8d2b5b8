"""A dynamic batcher: requests that arrive close together run as one call of a batch function, off the event loop.

The batcher knows nothing about models (see :class:`DynamicBatcher` for the batch function). A batch closes when
it is full or when ``max_wait_s`` has passed since its oldest item arrived, so a lone request waits at most the
window, and requests that queued while the previous batch ran go out at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatchFailed(RuntimeError):
    """The batch that held this request raised; ``cause`` is what it raised. Other batches are unaffected."""

    def __init__(self, cause: BaseException, batch_size: int) -> None:
        super().__init__(
            f"the batch of {batch_size} request(s) holding this one failed: {type(cause).__name__}: {cause}"
        )
        self.cause = cause
        self.batch_size = batch_size


class QueueFull(RuntimeError):
    """More requests are waiting than the batcher accepts (``max_queue``); the client should retry later."""


class BatcherClosed(RuntimeError):
    """The batcher is stopped (the server is shutting down) or was never started."""


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future
    arrived: float


@dataclass
class BatcherStats:
    """Counters since start: what ``/metrics`` reports.

    Args:
        batches: batches run (failed ones included).
        requests: requests that went into a batch.
        failed_batches: batches whose function raised.
        batch_sizes: how many batches had each size.
    """

    batches: int = 0
    requests: int = 0
    failed_batches: int = 0
    batch_sizes: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counters (batch sizes as ``{"size": count}``, largest batch, mean size)."""
        return {
            "batches": self.batches,
            "requests": self.requests,
            "failed_batches": self.failed_batches,
            "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
            "max_batch_size_seen": max(self.batch_sizes, default=0),
            "mean_batch_size": self.requests / self.batches if self.batches else 0.0,
        }


class DynamicBatcher(Generic[Item, Result]):
    """Gathers concurrent submissions into batches and runs ``run_batch`` on them, one batch at a time.

    Args:
        run_batch: called on the worker thread with a list of items; returns one result per item, in order.
            If it raises, every request of that batch gets :class:`BatchFailed`; the batcher goes on.
        max_batch_size: the most items in one call.
        max_wait_s: how long a batch stays open for more items after its oldest item arrived.
        max_queue: the most items waiting (not yet in a running batch); more raise :class:`QueueFull`.
            ``None``: no limit.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int | None = None,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s!r}")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None, got {max_queue!r}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        # One thread: the batch function (a model) runs one batch at a time, and never on the event loop.
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        """Whether :meth:`start` was called and :meth:`stop` not yet."""
        return self._task is not None and not self._task.done()

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self.running:
            raise RuntimeError("the batcher is already running")
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dynamic-batcher")

    async def stop(self) -> None:
        """Stop taking batches; every request not yet answered gets :class:`BatcherClosed`.

        A batch already on the worker thread runs to its end there, unobserved. (uvicorn lets in-flight requests
        finish before the app's shutdown runs, so normally nothing is left to refuse.)
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue is not None:
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(BatcherClosed("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` and wait for its result.

        Args:
            item: one request, as ``run_batch`` takes it.

        Raises:
            BatchFailed: the batch holding the item raised.
            QueueFull: ``max_queue`` items are already waiting.
            BatcherClosed: the batcher is not running.
        """
        if not self.running or self._queue is None:
            raise BatcherClosed("the batcher is not running")
        if self.max_queue is not None and self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests are already waiting (max_queue={self.max_queue})")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, future, time.monotonic()))
        return await future

    async def _next_batch(self) -> list[_Pending]:
        assert self._queue is not None
        first = await self._queue.get()
        batch = [first]
        # The window runs from the oldest item's arrival: items that queued behind a running batch go out at once.
        deadline = first.arrived + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        # A client that went away (its future cancelled) does not take a row.
        return [pending for pending in batch if not pending.future.done()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            items = [pending.item for pending in batch]
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.batch_sizes[len(batch)] += 1
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, items)
                if len(results) != len(items):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(items)} items")
            except asyncio.CancelledError:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(BatcherClosed("the server is shutting down"))
                raise
            except Exception as error:  # any failure of one batch goes to its own requests only
                self.stats.failed_batches += 1
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(BatchFailed(error, len(batch)))
                continue
            for pending, result in zip(batch, results):
                if not pending.future.done():
                    pending.future.set_result(result)
