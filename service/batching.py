"""Dynamic micro-batching: concurrent requests' images share one model call, off the event loop."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More images are admitted than the queue may hold; the client should retry later."""


class BatchObserver(Protocol):
    def batch(self, size: int, seconds: float) -> None: ...
    def queue_depth(self, images: int) -> None: ...


@dataclass
class _Item:
    image: np.ndarray
    future: asyncio.Future


class MicroBatcher:
    """Collects images into batches of at most ``max_batch_size``, waiting at most ``max_wait_s``
    after the first image of a batch, and runs each batch in one worker thread.

    Admission (``admit``) is counted per image from the moment a request is accepted until its
    results are out, so decoding work is also bounded; beyond ``max_queue_images`` it raises
    ``QueueFull``. Inference runs in a single dedicated thread (onnxruntime parallelises inside
    one call), so the event loop never blocks and batches never compete for the cores.
    """

    def __init__(self, run, *, max_batch_size: int, max_wait_s: float, max_queue_images: int,
                 observer: BatchObserver | None = None):
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self._observer = observer
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="s4l-infer")
        self._task: asyncio.Task | None = None
        self.admitted = 0

    # -- admission -------------------------------------------------------------------------
    def admit(self, n: int) -> _Admission:
        if self._task is None or self._task.done():
            raise QueueFull("the batcher is not running (starting up or shutting down)")
        if self.admitted + n > self.max_queue_images:
            raise QueueFull(f"{self.admitted} images in flight; limit {self.max_queue_images}")
        self.admitted += n
        self._depth()
        return _Admission(self, n)

    def _release(self, n: int) -> None:
        self.admitted -= n
        self._depth()

    def _depth(self) -> None:
        if self._observer:
            self._observer.queue_depth(self.admitted)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="s4l-batcher")

    async def stop(self) -> None:
        """Finish everything already queued, then stop."""
        if self._task is None:
            return
        await self._queue.put(None)
        await self._task
        self._executor.shutdown(wait=True)

    # -- work ------------------------------------------------------------------------------
    async def submit(self, images: list[np.ndarray]) -> list[asyncio.Future]:
        """Queue images in order; each future resolves to that image's outputs dict."""
        loop = asyncio.get_running_loop()
        futures = []
        for img in images:
            fut = loop.create_future()
            self._queue.put_nowait(_Item(img, fut))
            futures.append(fut)
        return futures

    async def _next_batch(self) -> tuple[list[_Item], bool]:
        first = await self._queue.get()
        if first is None:
            return [], True
        batch, stop = [first], False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if self.admitted <= len(batch):
                    break  # every admitted image is in this batch: waiting cannot add any
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            batch, stop = await self._next_batch()
            batch = [it for it in batch if not it.future.done()]  # timed-out requests are skipped
            if not batch:
                continue
            t0 = loop.time()
            try:
                arr = np.stack([it.image for it in batch])
                outs = await loop.run_in_executor(self._executor, self._run, arr)
            except Exception:  # never the server; and one image must not fail its batch-mates
                log.exception("inference failed for a batch of %d; retrying one by one", len(batch))
                await self._one_by_one(batch)
                continue
            if self._observer:
                self._observer.batch(len(batch), loop.time() - t0)
            for i, it in enumerate(batch):
                if not it.future.done():
                    it.future.set_result({k: v[i] for k, v in outs.items()})

    async def _one_by_one(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        for it in batch:
            if it.future.done():
                continue
            try:
                outs = await loop.run_in_executor(self._executor, self._run, it.image[None])
            except Exception as e:
                it.future.set_exception(e)
                continue
            if not it.future.done():
                it.future.set_result({k: v[0] for k, v in outs.items()})


class _Admission:
    def __init__(self, batcher: MicroBatcher, n: int):
        self._batcher, self._n = batcher, n

    def __enter__(self) -> _Admission:
        return self

    def __exit__(self, *exc) -> None:
        self._batcher._release(self._n)
