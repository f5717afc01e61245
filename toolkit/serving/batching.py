"""Dynamic batching: requests that arrive together share one model run.

A server handles each request in its own coroutine; on a small model most of a run's cost is
fixed (a call into onnxruntime, thread wake-ups), so eight single images cost little more
than one batch of eight. While one run computes, requests queue; the next run takes all that
queued (never more than `max_batch_size` images, unless one request alone is bigger), holding
the first up to `max_delay_s` for more to join, and hands each caller exactly its own rows.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

BatchRun = Callable[[np.ndarray], Sequence[np.ndarray]]


@dataclass
class _Pending:
    images: np.ndarray
    answer: asyncio.Future = field(repr=False)


class DynamicBatcher:
    """Merges concurrent `submit` calls into runs of `run` (rows in, rows out, in order).

    `run` executes on one worker thread, so the event loop keeps accepting requests while a
    batch computes, and the next batch gathers meanwhile. `on_batch(images, requests)` is
    called after each run (metrics). With `max_batch_size` 1 every request runs alone.
    """

    def __init__(self, run: BatchRun, *, max_batch_size: int, max_delay_s: float,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        if max_batch_size < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size must be at least 1 and max_delay_s not negative")
        self.run, self.max_batch_size, self.max_delay_s = run, max_batch_size, max_delay_s
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carried: collections.deque[_Pending] = collections.deque()
        self._worker: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")

    async def submit(self, images: np.ndarray) -> list[np.ndarray]:
        """The outputs of `run` for `images` alone, computed in whatever batch they joined."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve(), name="dynamic-batcher")
        pending = _Pending(images, loop.create_future())
        self._queue.put_nowait(pending)
        return await pending.answer

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _serve(self) -> None:
        while True:
            batch = await self._gather()
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                for pending in batch:
                    pending.answer.cancel()
                raise

    async def _gather(self) -> list[_Pending]:
        """The next batch: the oldest request, then whatever joins within the delay and fits."""
        assert self._queue is not None
        first = self._carried.popleft() if self._carried else await self._queue.get()
        batch, size = [first], len(first.images)
        deadline = asyncio.get_running_loop().time() + self.max_delay_s
        while size < self.max_batch_size:
            try:
                if self._carried:
                    pending = self._carried.popleft()
                else:
                    remaining = deadline - asyncio.get_running_loop().time()
                    pending = (self._queue.get_nowait() if remaining <= 0 or not self._queue.empty()
                               else await asyncio.wait_for(self._queue.get(), remaining))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):  # two types before Python 3.11
                break
            if size + len(pending.images) > self.max_batch_size:
                self._carried.appendleft(pending)  # first in the next batch: order is kept
                break
            batch.append(pending)
            size += len(pending.images)
        return [pending for pending in batch if not pending.answer.done()]  # a caller gone is skipped

    async def _run(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._executor, self.run, images)
        except Exception as exc:  # every caller of this batch hears of it; the batcher goes on
            for pending in batch:
                if not pending.answer.done():
                    pending.answer.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(images), len(batch))
        start = 0
        for pending in batch:
            stop = start + len(pending.images)
            if not pending.answer.done():
                pending.answer.set_result([output[start:stop] for output in outputs])
            start = stop
