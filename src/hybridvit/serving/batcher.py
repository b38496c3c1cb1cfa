"""Dynamic batching for a server: concurrent requests' images become one model call.

Requests ``submit`` decoded images; one worker task takes the first waiting image, gathers more
until ``max_batch_size`` or until ``max_wait_s`` has passed since the first, and runs the batch
in a thread of its own (one batch at a time per model replica, on the threads the model was
built for), so the event loop keeps serving. A request whose client went away is dropped from
its batch before the call; a model error fails that batch's requests only. ``hurry`` (on
shutdown) runs whatever is waiting at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from . import tracing

RunBatch = Callable[[np.ndarray], torch.Tensor]  # uint8 (N, 3, H, W) -> (N, outputs)
Item = tuple[np.ndarray, asyncio.Future, "tracing.Waiting | None"]  # an image, its row to come, its trace


class Batcher:
    """Gathers ``submit`` calls into batches for ``run``; ``on_batch(size)`` is told each batch's size.
    A batch stops waiting early when ``incoming()`` says no other image is on its way, so a lone
    request does not pay ``max_wait_s``. ``executor``: the one thread batches run on (default:
    its own). ``in_flight()``: how many batches may be handed to it at once: 1 (the next batch
    gathers what came while one ran), or 2 where models share the executor, so that each has a
    batch waiting there when a call ends and the executor's fairness has a choice to make."""

    def __init__(self, run: RunBatch, max_batch_size: int, max_wait_s: float,
                 on_batch: Callable[[int], None] = lambda size: None, incoming: Callable[[], int] = lambda: 1,
                 executor: Executor | None = None, in_flight: Callable[[], int] = lambda: 1) -> None:
        self.run, self.max_batch_size, self.max_wait_s, self.on_batch = run, max_batch_size, max_wait_s, on_batch
        self.incoming = incoming  # images on their way (decoding): with none, a batch need not wait
        self.queue: asyncio.Queue[Item | None] = asyncio.Queue()  # None: hurry
        self._owns_executor = executor is None  # a server's models share one: one model call at a time
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="batch")
        self._worker: asyncio.Task | None = None
        self._waiting = 0
        self.in_flight = in_flight
        self._running: set[asyncio.Task] = set()

    @property
    def depth(self) -> int:
        """Images submitted and not yet in a running batch."""
        return self._waiting

    def hurry(self) -> None:
        """From now on, batches run as soon as they have an image (the server is draining)."""
        self.max_wait_s = 0.0
        self.queue.put_nowait(None)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the batch thread, between two batches: one model call at a time."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def submit(self, image: np.ndarray, trace: tracing.Waiting | None = None) -> asyncio.Future:
        """Queue one decoded image at once; the future gets its output row, computed in some batch
        (cancel it to leave the batch). ``trace``: filled with the batch's span and times."""
        future = asyncio.get_running_loop().create_future()
        self._waiting += 1
        self.queue.put_nowait((image, future, trace))  # unbounded: never waits
        return future

    async def _gather(self) -> list[Item]:
        batch = []
        loop = asyncio.get_running_loop()
        deadline = None
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                item = self.queue.get_nowait()
            elif not batch:
                item = await self.queue.get()
            else:
                left = (deadline or 0.0) - loop.time()
                if left <= 0 or self.incoming() == 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if item is None:  # hurry: run what is here
                if batch:
                    break
                continue
            batch.append(item)
            if deadline is None:
                deadline = loop.time() + self.max_wait_s
        self._waiting -= len(batch)
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while len(self._running) >= self.in_flight():
                await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
            batch = [item for item in await self._gather() if not item[1].done()]
            if not batch:
                continue  # every client of this batch went away
            self.on_batch(len(batch))
            task = loop.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[Item]) -> None:
        try:
            with tracing.batch([trace for _, _, trace in batch], len(batch)):
                out = await asyncio.get_running_loop().run_in_executor(self._executor, self.run,
                                                                       np.stack([image for image, _, _ in batch]))
        except Exception as e:  # noqa: BLE001 - fails this batch's requests; the next batch runs
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future, _), row in zip(batch, out):
            if not future.done():  # a client that left mid-batch: its row is dropped
                future.set_result(row)
