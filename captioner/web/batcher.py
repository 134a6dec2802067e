"""Micro-batching: images from concurrent requests share one forward pass.

One worker takes requests off a queue. While a batch runs, new requests queue up, and the next
batch takes all of them (up to `max_batch` images), so under load the model runs full batches and
an idle server answers a lone request at once.

A batch waits for requests it expects, and only for those: requests already being read and
decoded (for up to half a forward pass: each would otherwise wait a whole one), and as many as
were in the server at once lately (for up to `max_wait_ms`: clients answered a moment ago usually
come straight back). Without that wait, 8 clients split into two groups of 4 that take turns, and
every request waits for the other group's forward too. A lone client never waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


@dataclass
class _Request:
    key: Hashable  # requests share a batch only when their keys (decoding options) are equal
    items: list
    future: asyncio.Future


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it
    seconds: float = 0.0  # in forward passes, all batches together

    def add(self, size: int, seconds: float = 0.0) -> None:
        self.batches += 1
        self.seconds += seconds
        self.images += size
        self.largest = max(self.largest, size)
        self.sizes[size] = self.sizes.get(size, 0) + 1


class MicroBatcher:
    def __init__(self, run: Callable[[Hashable, list], list], max_batch: int = 16, max_wait_ms: float = 25.0):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.stats = BatchStats()
        self._arriving = 0  # requests being read and decoded
        self._active = 0  # requests in the server, from arrival to answer
        self._peak, self._peak_at = 0, 0.0  # the most requests active at once, and when
        self._forward = 0.0  # seconds per forward pass, a running average
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    def arrive(self) -> None:
        """A request started (its body is being read): call `decoded()` and then `answered()` for it."""
        self._arriving += 1
        self._active += 1
        if self._active >= self._recent_peak():
            self._peak, self._peak_at = self._active, time.monotonic()

    def decoded(self) -> None:
        self._arriving -= 1

    def answered(self) -> None:
        self._active -= 1

    def _recent_peak(self) -> int:
        window = max(3.0, 3 * self._forward)  # a few forward passes: clients return after theirs
        return self._peak if time.monotonic() - self._peak_at <= window else self._active

    async def submit(self, key: Hashable, items: list) -> list:
        """Results for `items`, in order, computed in a batch with other requests of the same key."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started: call `await batcher.start()` first")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(key, items, future))
        return await future

    async def _collect(self) -> list[_Request]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        count, start = len(batch[0].items), loop.time()
        while count < self.max_batch:
            if self._queue.empty():
                if self._arriving > 0:
                    limit = max(self.max_wait, self._forward / 2)
                elif len(batch) < self._recent_peak():
                    limit = self.max_wait
                else:
                    break
                if loop.time() - start >= limit:
                    break
                await asyncio.sleep(0.002)  # poll: an arriving request may also fail and never come
                continue
            request = self._queue.get_nowait()
            batch.append(request)
            count += len(request.items)
        return batch

    async def _loop(self) -> None:
        while True:
            requests = await self._collect()
            groups: dict[Hashable, list[_Request]] = {}
            for request in requests:
                groups.setdefault(request.key, []).append(request)
            for key, group in groups.items():
                items = [item for request in group for item in request.items]
                began = time.monotonic()
                try:
                    results = await asyncio.to_thread(self.run, key, items)
                except Exception as e:  # noqa: BLE001 - handed to the waiting requests, the worker lives on
                    for request in group:
                        if not request.future.done():
                            request.future.set_exception(e)
                    continue
                elapsed = time.monotonic() - began
                self._forward = elapsed if not self._forward else 0.8 * self._forward + 0.2 * elapsed
                self.stats.add(len(items), elapsed)
                start = 0
                for request in group:
                    if not request.future.done():  # a client that hung up cancels its future
                        request.future.set_result(results[start : start + len(request.items)])
                    start += len(request.items)
