"""Dynamic batching for a server: concurrent requests' images become one model call.

Requests ``submit`` decoded images; one worker task takes the first waiting image, gathers more
until ``max_batch_size`` or until ``max_wait_s`` has passed since the first, and runs the batch
in a thread of its own (one batch at a time per model replica, on the threads the model was
built for), so the event loop keeps serving. A request whose client went away is dropped from
its batch before the call; a model error fails that batch's requests only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

RunBatch = Callable[[np.ndarray], torch.Tensor]  # uint8 (N, 3, H, W) -> (N, outputs)


class Batcher:
    """Gathers ``submit`` calls into batches for ``run``; ``on_batch(size)`` is told each batch's size."""

    def __init__(self, run: RunBatch, max_batch_size: int, max_wait_s: float,
                 on_batch: Callable[[int], None] = lambda size: None) -> None:
        self.run, self.max_batch_size, self.max_wait_s, self.on_batch = run, max_batch_size, max_wait_s, on_batch
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="batch")
        self._worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Images waiting for a batch."""
        return self.queue.qsize()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(self, image: np.ndarray) -> torch.Tensor:
        """The model's output row for one decoded image, computed in some batch."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future

    async def _gather(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(image, future) for image, future in await self._gather() if not future.done()]
            if not batch:
                continue  # every client of this batch went away
            self.on_batch(len(batch))
            try:
                out = await loop.run_in_executor(self._executor, self.run, np.stack([image for image, _ in batch]))
            except Exception as e:  # noqa: BLE001 - fails this batch's requests; the next batch runs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), row in zip(batch, out):
                if not future.done():  # a client that left mid-batch: its row is dropped
                    future.set_result(row)
