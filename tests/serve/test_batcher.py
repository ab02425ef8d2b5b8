"""The dynamic batcher on its own (no model, no web framework): windows, sizes, failures, threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from peft_swift_ext.serve.batcher import BatcherClosed, BatchFailed, DynamicBatcher, QueueFull


class Recorder:
    """A batch function that records each batch and the thread it ran on; it fails batches holding ``"bad"``."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.threads: set[int] = set()
        self.active = 0
        self.most_active = 0
        self.lock = threading.Lock()

    def __call__(self, items: list) -> list:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            self.batches.append(list(items))
            self.threads.add(threading.get_ident())
            if "bad" in items:
                raise RuntimeError("a bad item")
            return [f"done {item}" for item in items]
        finally:
            with self.lock:
                self.active -= 1


def run(coroutine):
    # A generous bound instead of a timing assertion: a batcher that waited past its window would hang here.
    return asyncio.run(asyncio.wait_for(coroutine, timeout=30))


async def started(function, **kwargs) -> DynamicBatcher:
    batcher = DynamicBatcher(function, **kwargs)
    await batcher.start()
    return batcher


def test_each_submitter_gets_its_own_result():
    recorder = Recorder()

    async def main():
        batcher = await started(recorder, max_batch_size=8, max_wait_s=0.05)
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        finally:
            await batcher.stop()

    assert run(main()) == [f"done {i}" for i in range(5)]


def test_requests_within_the_window_share_one_batch():
    recorder = Recorder()

    async def main():
        # A long window and room for 3: the batch closes when the third arrives, not when the window ends.
        batcher = await started(recorder, max_batch_size=3, max_wait_s=60)
        try:
            first = asyncio.ensure_future(batcher.submit("a"))
            await asyncio.sleep(0.05)
            rest = await asyncio.gather(batcher.submit("b"), batcher.submit("c"))
            return [await first, *rest]
        finally:
            await batcher.stop()

    assert run(main()) == ["done a", "done b", "done c"]
    assert recorder.batches == [["a", "b", "c"]]


def test_a_request_after_the_window_goes_into_a_new_batch():
    recorder = Recorder()

    async def main():
        batcher = await started(recorder, max_batch_size=8, max_wait_s=0.01)
        try:
            first = await batcher.submit("a")
            second = await batcher.submit("b")
            return first, second
        finally:
            await batcher.stop()

    assert run(main()) == ("done a", "done b")
    assert recorder.batches == [["a"], ["b"]]


def test_batches_never_exceed_max_batch_size():
    recorder = Recorder()

    async def main():
        batcher = await started(recorder, max_batch_size=4, max_wait_s=0.01)
        try:
            results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
            return results, batcher.stats.as_dict()
        finally:
            await batcher.stop()

    results, stats = run(main())
    assert results == [f"done {i}" for i in range(10)]
    # all ten were queued before the loop woke, so the batches fill in order
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert stats["batch_sizes"] == {"2": 1, "4": 2} and stats["requests"] == 10 and stats["batches"] == 3


def test_a_failing_batch_fails_only_its_own_requests():
    recorder = Recorder()

    async def main():
        batcher = await started(recorder, max_batch_size=2, max_wait_s=0.01)
        try:
            outcomes = await asyncio.gather(
                *(batcher.submit(x) for x in ["ok1", "bad", "ok2", "ok3"]), return_exceptions=True
            )
            after = await batcher.submit("later")
            return outcomes, after, batcher.stats.as_dict()
        finally:
            await batcher.stop()

    outcomes, after, stats = run(main())
    assert recorder.batches[:2] == [["ok1", "bad"], ["ok2", "ok3"]]
    assert isinstance(outcomes[0], BatchFailed) and isinstance(outcomes[1], BatchFailed)
    assert "RuntimeError: a bad item" in str(outcomes[0]) and outcomes[0].batch_size == 2
    assert outcomes[2:] == ["done ok2", "done ok3"]
    assert after == "done later"
    assert stats["failed_batches"] == 1


def test_a_wrong_number_of_results_fails_the_batch():
    async def main():
        batcher = await started(lambda items: ["only one"], max_batch_size=2, max_wait_s=0.01)
        try:
            return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        finally:
            await batcher.stop()

    outcomes = run(main())
    assert all(isinstance(o, BatchFailed) and "returned 1 results for 2 items" in str(o) for o in outcomes)


def test_batches_run_one_at_a_time_off_the_event_loop():
    recorder = Recorder()

    async def main():
        batcher = await started(recorder, max_batch_size=2, max_wait_s=0)
        try:
            await asyncio.gather(*(batcher.submit(i) for i in range(9)))
        finally:
            await batcher.stop()
        return threading.get_ident()

    loop_thread = run(main())
    assert recorder.most_active == 1
    assert len(recorder.threads) == 1 and loop_thread not in recorder.threads


def test_a_cancelled_request_takes_no_row():
    recorder = Recorder()

    async def main():
        batcher = await started(recorder, max_batch_size=8, max_wait_s=0.2)
        try:
            gone = asyncio.ensure_future(batcher.submit("gone"))
            await asyncio.sleep(0)  # it is queued
            gone.cancel()
            return await batcher.submit("kept")
        finally:
            await batcher.stop()

    assert run(main()) == "done kept"
    assert recorder.batches == [["kept"]]


def test_a_full_queue_refuses_more():
    gate = threading.Event()

    def blocked(items):
        gate.wait(10)
        return items

    async def main():
        batcher = await started(blocked, max_batch_size=1, max_wait_s=0, max_queue=2)
        try:
            running = asyncio.ensure_future(batcher.submit("running"))
            await asyncio.sleep(0.1)  # taken into a batch; it blocks the worker
            waiting = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(QueueFull, match="max_queue=2"):
                await batcher.submit("one too many")
            gate.set()
            return [await running, *[await w for w in waiting]]
        finally:
            gate.set()
            await batcher.stop()

    assert run(main()) == ["running", 0, 1]


def test_stop_fails_waiting_requests_and_refuses_new_ones():
    gate = threading.Event()

    def blocked(items):
        gate.wait(10)
        return items

    async def main():
        batcher = await started(blocked, max_batch_size=1, max_wait_s=0)
        running = asyncio.ensure_future(batcher.submit("running"))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(batcher.submit("waiting"))
        await asyncio.sleep(0)
        await batcher.stop()
        gate.set()
        outcomes = await asyncio.gather(running, waiting, return_exceptions=True)
        with pytest.raises(BatcherClosed):
            await batcher.submit("after")
        return outcomes

    outcomes = run(main())
    assert all(isinstance(o, BatcherClosed) for o in outcomes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_batch_size": 0}, "max_batch_size"), ({"max_wait_s": -1}, "max_wait_s"), ({"max_queue": 0}, "max_queue")],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicBatcher(lambda items: items, **kwargs)
