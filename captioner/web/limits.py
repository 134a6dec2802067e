"""The server's bounds: per-request limits, the body cap, the decoded-pixel budget and the API key.

Every bound is a number from the config, never a function of the host's core count, so the memory a
server can hold is the same on 2 cores and on 64: at most `max_requests` bodies of `max_body_mb`,
`decode_budget_mb` of decoded pixels, and `max_queued_images` small (3, R, R) tensors in the queue.
"""

from __future__ import annotations

import asyncio
import hmac
from collections import deque
from dataclasses import dataclass

from fastapi import HTTPException
from fastapi.responses import JSONResponse


@dataclass(frozen=True)
class Limits:
    max_body_mb: float = 32.0  # whole request; enforced while reading, so a bigger body is never buffered
    max_pixels: int = 50_000_000  # per image, from its header: a 48 MP phone photo passes, a bomb does not
    max_images: int = 16  # per request
    max_new_tokens: int = 60
    max_beams: int = 8
    decode_budget_mb: float = 1024.0  # decoded pixels held at once, all requests together; others wait their turn
    decode_threads: int = 4  # images decoded at once (a fixed pool, not one sized by the core count)
    max_queued_images: int = 64  # images waiting for the model; a request beyond it gets 503 + Retry-After
    request_timeout_s: float = 60.0  # from arrival to answer; past it a request gets 503 + Retry-After
    max_requests: int = 32  # requests in the app at once; the next get 503 + Retry-After (their bodies read and dropped)
    max_connections: int = 1024  # uvicorn's limit_concurrency, the backstop: open connections beyond it are refused


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit / 2**20:.0f} MB; send fewer or smaller images")


class BodyLimit:
    """ASGI middleware: refuse a declared Content-Length over the limit at once, and stop reading a
    streamed body as soon as it passes the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"detail": BodyTooLarge(self.limit).detail}, 413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class RequestLimit:
    """ASGI middleware: at most `limit` requests in the app at once (the page and probes aside); the next
    get 503 + Retry-After at once. Their body is read and dropped first (BodyLimit caps it): a server
    that answers and closes with unread bytes resets the connection, and the client sees no answer."""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            try:
                while (await receive()).get("more_body", False):
                    pass
            except HTTPException:  # over the body limit: answered as busy all the same
                pass
            detail = f"the server is busy ({self.active} requests in progress); retry later"
            response = JSONResponse({"detail": detail}, 503, headers={"Retry-After": "1"})
            return await response(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


OPEN_PATHS = ("/", "/healthz", "/readyz")  # the page and the probes answer without the key; captions and docs need it


class ApiKey:
    """ASGI middleware: every path but OPEN_PATHS needs `Authorization: Bearer KEY` (or `X-API-Key: KEY`);
    without it, 401. The comparison takes the same time whatever the key sent."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        sent = headers.get(b"x-api-key", b"")
        authorization = headers.get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer ":
            sent = authorization[7:].strip()
        if not hmac.compare_digest(sent, self.key):
            detail = "this server needs an API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            response = JSONResponse({"detail": detail}, 401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class DecodeBudget:
    """Bytes of decoded pixels held at once, across all requests: a decode waits (first come, first
    served) until its cost fits. `peak` is the most ever held, for tests and /healthz."""

    def __init__(self, limit_bytes: int):
        self.limit, self.used, self.peak = int(limit_bytes), 0, 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, cost: int) -> None:
        if cost > self.limit:
            raise ValueError(f"a decode of {cost} bytes can never fit the budget of {self.limit}")
        if not self._waiters and self.used + cost <= self.limit:
            self._take(cost)
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append((cost, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted just as it was cancelled: hand it back
                self.release(cost)
            else:
                self._wake()  # it may have been the head of the line
            raise

    def release(self, cost: int) -> None:
        self.used -= cost
        self._wake()

    def _take(self, cost: int) -> None:
        self.used += cost
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self._waiters:
            cost, granted = self._waiters[0]
            if granted.done():  # cancelled while waiting
                self._waiters.popleft()
            elif self.used + cost <= self.limit:
                self._waiters.popleft()
                self._take(cost)
                granted.set_result(None)
            else:
                return
