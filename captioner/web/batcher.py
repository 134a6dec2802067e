"""Micro-batching: images from concurrent requests share one forward pass.

One worker takes requests off a queue. While a batch runs, new requests queue up, and the next
batch takes all of them (up to `max_batch` images), so under load the model runs full batches and
an idle server answers a lone request at once.

A batch waits for requests it expects, and only for those: requests already being read and
decoded (for up to half a forward pass: each would otherwise wait a whole one), and as many as
were in the server at once lately (for up to `max_wait_ms`: clients answered a moment ago usually
come straight back). Without that wait, 8 clients split into two groups of 4 that take turns, and
every request waits for the other group's forward too. A lone client never waits.

Bounds: a batch never holds more than `max_batch` images (a larger request runs in slices of it); the
queue holds at most `max_queued` images (beyond: `Busy`, which the app answers 503 + Retry-After); a
request whose caller gave up (its future cancelled: deadline or hang-up) is dropped before it runs.
When a forward pass fails, each request of the batch is retried alone, so one bad input fails only
its own request; `failure` names the last failure while no forward pass has succeeded since.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


@dataclass
class _Request:
    key: Hashable  # requests share a batch only when their keys (decoding options) are equal
    items: list
    future: asyncio.Future


class Busy(Exception):
    """The queue is full or the worker is down; `retry_after` is a whole number of seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it
    seconds: float = 0.0  # in forward passes, all batches together
    dropped: int = 0  # requests whose caller gave up before their batch ran
    failed: int = 0  # forward passes that raised

    def add(self, size: int, seconds: float = 0.0) -> None:
        self.batches += 1
        self.seconds += seconds
        self.images += size
        self.largest = max(self.largest, size)
        self.sizes[size] = self.sizes.get(size, 0) + 1


class MicroBatcher:
    def __init__(self, run: Callable[[Hashable, list], list], max_batch: int = 16, max_wait_ms: float = 25.0,
                 max_queued: int = 64):
        if max_batch < 1 or max_queued < 1:
            raise ValueError(f"max_batch ({max_batch}) and max_queued_images ({max_queued}) must be at least 1")
        self.run, self.max_batch, self.max_wait, self.max_queued = run, max_batch, max_wait_ms / 1000, max_queued
        self.stats = BatchStats()
        self.failure: str | None = None  # the last forward pass's error, until one succeeds
        self._arriving = 0  # requests being read and decoded
        self._active = 0  # requests in the server, from arrival to answer
        self._peak, self._peak_at = 0, 0.0  # the most requests active at once, and when
        self._forward = 0.0  # seconds per forward pass, a running average
        self._pending: deque[_Request] = deque()
        self._queued = 0  # images in _pending
        self._inflight: list[_Request] = []  # the batch being collected or run, answered even if the worker dies
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    @property
    def alive(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def queued(self) -> int:
        return self._queued

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

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: its batches times the forward time, at least 1."""
        return max(1, math.ceil((self._queued / self.max_batch + 1) * self._forward))

    async def submit(self, key: Hashable, items: list) -> list:
        """Results for `items`, in order, computed in a batch with other requests of the same key.
        An item whose forward pass failed even alone is an `Exception` in its place. Raises `Busy`."""
        if self._wake is None:
            raise RuntimeError("the batcher is not started: call `await batcher.start()` first")
        if not self.alive:
            raise Busy("the captioning worker has stopped; the server must be restarted", 30)
        if self._queued + len(items) > self.max_queued:
            raise Busy(f"the server is busy ({self._queued} images queued); retry later", self.retry_after())
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(key, items, future))
        self._queued += len(items)
        self._wake.set()
        try:
            return await future
        finally:
            if not future.done():  # the caller gave up (deadline, hang-up): the worker drops it unrun
                future.cancel()

    def _pop(self) -> _Request | None:
        """The next request whose caller still waits; abandoned ones are dropped."""
        while self._pending:
            request = self._pending.popleft()
            self._queued -= len(request.items)
            if not request.future.done():
                return request
            self.stats.dropped += 1
        return None

    async def _next(self) -> _Request:
        while (request := self._pop()) is None:
            self._wake.clear()
            await self._wake.wait()
        return request

    async def _collect(self) -> list[_Request]:
        loop = asyncio.get_running_loop()
        batch = self._inflight
        batch.append(await self._next())
        count, start = len(batch[0].items), loop.time()
        while count < self.max_batch:
            while self._pending and self._pending[0].future.done():
                self._pop()  # drops abandoned requests at the head
            if not self._pending:
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
            if count + len(self._pending[0].items) > self.max_batch:
                break  # the hard cap: the next request starts the next batch
            request = self._pop()
            batch.append(request)
            count += len(request.items)
        return batch

    async def _forward_pass(self, key: Hashable, items: list) -> list:
        """Results for `items`, in slices of at most `max_batch`; raises what the model raised."""
        results = []
        for begin in range(0, len(items), self.max_batch):
            chunk = items[begin : begin + self.max_batch]
            began = time.monotonic()
            try:
                results += await asyncio.to_thread(self.run, key, chunk)
            except Exception as e:
                self.stats.failed += 1
                self.failure = f"{type(e).__name__}: {e}"
                raise
            elapsed = time.monotonic() - began
            self._forward = elapsed if not self._forward else 0.8 * self._forward + 0.2 * elapsed
            self.stats.add(len(chunk), elapsed)
            self.failure = None
        return results

    async def _loop(self) -> None:
        try:
            await self._serve()
        finally:  # stopped or crashed: nobody will answer the batch in flight or what is queued
            stopped = Busy("the captioning worker has stopped; the server must be restarted", 30)
            for request in self._inflight:
                if not request.future.done():
                    request.future.set_exception(stopped)
            while (request := self._pop()) is not None:
                request.future.set_exception(stopped)

    async def _serve(self) -> None:
        while True:
            self._inflight = []
            requests = await self._collect()
            groups: dict[Hashable, list[_Request]] = {}
            for request in requests:
                groups.setdefault(request.key, []).append(request)
            for key, group in groups.items():
                group = [r for r in group if not r.future.done()]  # gave up while the batch gathered
                try:
                    results = await self._forward_pass(key, [item for request in group for item in request.items])
                    start = 0
                    for request in group:
                        _answer(request, results[start : start + len(request.items)])
                        start += len(request.items)
                except Exception:  # noqa: BLE001 - retried one image at a time: the error stays with its image
                    for request in group:
                        if not request.future.done():
                            _answer(request, [await self._alone(key, item) for item in request.items])

    async def _alone(self, key: Hashable, item) -> object:
        try:
            return (await self._forward_pass(key, [item]))[0]
        except Exception as e:  # noqa: BLE001 - handed to the image's request as its result
            return e


def _answer(request: _Request, results: list) -> None:
    if not request.future.done():  # a caller that gave up cancelled its future
        request.future.set_result(results)
