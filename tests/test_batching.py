import asyncio
import threading

import numpy as np
import pytest

from toolkit.serving.batching import DynamicBatcher


class Recorder:
    """A model run that doubles its rows and remembers each batch's size and thread."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        self.sizes.append(len(images))
        self.threads.add(threading.current_thread().name)
        if self.fail_on is not None and (images == self.fail_on).any():
            raise RuntimeError("the model failed")
        return [images * 2, images + 1]


def _requests(count: int, rows: int = 1) -> list[np.ndarray]:
    return [np.full((rows, 3), float(i), dtype=np.float32) for i in range(count)]


def test_concurrent_requests_share_runs_and_each_gets_its_own_rows():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=16, max_delay_s=0.05)
    requests = _requests(40, rows=2)

    async def main():
        return await asyncio.gather(*(batcher.submit(r) for r in requests))

    answers = asyncio.run(main())
    batcher.close()
    for request, (doubled, plus_one) in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(doubled, request * 2)
        np.testing.assert_array_equal(plus_one, request + 1)
    assert sum(run.sizes) == 80 and max(run.sizes) <= 16 and len(run.sizes) < 40
    assert run.threads == {next(iter(run.threads))} and "batcher" in next(iter(run.threads))


def test_a_request_bigger_than_the_batch_runs_alone_and_order_is_kept():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=4, max_delay_s=0.01)
    requests = [np.full((3, 1), 1.0), np.full((9, 1), 2.0), np.full((1, 1), 3.0)]

    async def main():
        return await asyncio.gather(*(batcher.submit(r) for r in requests))

    answers = asyncio.run(main())
    batcher.close()
    assert [len(a[0]) for a in answers] == [3, 9, 1]
    assert run.sizes == [3, 9, 1]  # 3 + 9 would overflow, 9 + 1 too: nothing merged past the limit


def test_without_batching_every_request_runs_alone():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=1, max_delay_s=0.0)

    async def main():
        return await asyncio.gather(*(batcher.submit(r) for r in _requests(10)))

    asyncio.run(main())
    batcher.close()
    assert run.sizes == [1] * 10


def test_a_failed_run_fails_its_callers_only_and_the_batcher_goes_on():
    run = Recorder(fail_on=3.0)
    batcher = DynamicBatcher(run, max_batch_size=1, max_delay_s=0.0)

    async def main():
        return await asyncio.gather(*(batcher.submit(r) for r in _requests(6)), return_exceptions=True)

    answers = asyncio.run(main())
    batcher.close()
    assert [isinstance(a, RuntimeError) for a in answers] == [False, False, False, True, False, False]


def test_a_caller_that_gave_up_is_left_out_of_the_batch():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=64, max_delay_s=0.2)

    async def main():
        gone = asyncio.create_task(batcher.submit(np.zeros((5, 3), np.float32)))
        await asyncio.sleep(0)  # queued
        gone.cancel()
        return await batcher.submit(np.ones((2, 3), np.float32))

    doubled, _ = asyncio.run(main())
    batcher.close()
    np.testing.assert_array_equal(doubled, np.full((2, 3), 2.0))
    assert run.sizes == [2]


@pytest.mark.parametrize(("size", "delay"), [(0, 0.0), (4, -1.0)])
def test_impossible_settings_are_refused(size, delay):
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch_size=size, max_delay_s=delay)
