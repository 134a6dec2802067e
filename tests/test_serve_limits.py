"""The server's bounds, one at a time: the decoded-pixel budget, the queue, the batch cap, deadlines,
abandoned requests, per-image errors, readiness, the API key and the model it names."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from captioner.api import Captioner
from captioner.web.app import create_app
from captioner.web.batcher import Busy, MicroBatcher
from captioner.web.identity import describe_model
from captioner.web.limits import DecodeBudget, Limits
from test_serve import encode, free_port, png_bomb, scene, serving

PNG = encode(scene(), "PNG")


@pytest.fixture(scope="module")
def captioner(embedded_ckpt) -> Captioner:
    return Captioner.from_pretrained(embedded_ckpt)


class Slowed:
    """A captioner whose forward pass takes `seconds` longer, and fails on a batch holding a white image."""

    def __init__(self, captioner: Captioner, seconds: float = 0.0):
        self.inner, self.seconds = captioner, seconds

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def caption_pixels(self, pixels, decoding=None, attention=False):
        time.sleep(self.seconds)
        if any(bool((p > 1.5).all()) for p in pixels):  # white after CLIP's normalisation: every value ~1.9-2.1
            raise RuntimeError("this image breaks the model")
        return self.inner.caption_pixels(pixels, decoding, attention)


def post(url: str, files, timeout: float = 60, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/captions", files=files, timeout=timeout, **kwargs)


def test_the_decode_budget_holds_whatever_the_thread_pool():
    """64 decodes on 64 threads (a 60-core host's pool) never hold more than the budget at once."""
    held, most = 0, 0
    lock = threading.Lock()

    def decode():
        nonlocal held, most
        with lock:
            held += 100
            most = max(most, held)
        time.sleep(0.02)
        with lock:
            held -= 100

    async def scenario():
        budget, pool, loop = DecodeBudget(300), ThreadPoolExecutor(64), asyncio.get_running_loop()

        async def one():
            await budget.acquire(100)
            try:
                await loop.run_in_executor(pool, decode)
            finally:
                budget.release(100)

        await asyncio.gather(*(one() for _ in range(64)))
        pool.shutdown()
        return budget

    budget = asyncio.run(scenario())
    assert most == 300 and budget.peak == 300 and budget.used == 0


def test_a_cancelled_wait_for_the_budget_leaves_it_whole():
    async def scenario():
        budget = DecodeBudget(100)
        await budget.acquire(100)
        waiting = asyncio.create_task(budget.acquire(60))
        await asyncio.sleep(0.01)
        budget.release(100)  # grants the waiter...
        waiting.cancel()  # ...whose caller gives up before it runs: the grant must come back
        await asyncio.gather(waiting, return_exceptions=True)
        await asyncio.wait_for(budget.acquire(100), 1)  # nothing leaked: the whole budget is free again
        return budget.used

    assert asyncio.run(scenario()) == 100


def test_bombs_decode_within_the_budget_and_too_big_a_decode_is_refused(captioner):
    limits = Limits(decode_budget_mb=300, decode_threads=8)  # room for one 7000x7000 decode (245 MB) at a time
    app = create_app(captioner, limits)
    bomb = png_bomb(7000)
    with serving(app) as url:

        async def burst():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(f"{url}/v1/captions", files={"images": ("b.png", bomb, "image/png")})
                                              for _ in range(4)))

        assert all(r.status_code == 200 and r.json()["results"][0]["caption"] for r in asyncio.run(burst()))
        health = httpx.get(f"{url}/healthz").json()
        assert 0 < health["decode_bytes_peak"] <= 300 * 2**20 and health["decode_bytes_held"] == 0
        big = post(url, {"images": ("c.png", png_bomb(7071), "image/png")})  # 50 M pixels, 250 MB: fits alone
        assert big.status_code == 200
    with serving(create_app(captioner, Limits(decode_budget_mb=200))) as url:
        refused = post(url, {"images": ("b.png", bomb, "image/png")})
        assert refused.status_code == 413 and "budget" in refused.json()["detail"]


def test_a_full_queue_answers_503_with_retry_after(captioner):
    app = create_app(Slowed(captioner, 1.0), Limits(max_queued_images=1), max_batch=1, max_wait_ms=0)
    with serving(app) as url:

        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(f"{url}/v1/captions", files={"images": ("a.png", PNG, "image/png")})
                                              for _ in range(5)))

        responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
    busy = next(r for r in responses if r.status_code == 503)
    assert int(busy.headers["Retry-After"]) >= 1 and "busy" in busy.json()["detail"]


def test_a_burst_past_max_requests_gets_503_answers_not_resets(captioner):
    app = create_app(Slowed(captioner, 0.5), Limits(max_requests=2))
    with serving(app) as url:

        async def burst():
            many = httpx.Limits(max_connections=None, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=60, limits=many) as client:
                return await asyncio.gather(*(client.post(f"{url}/v1/captions", files={"images": ("a.png", PNG, "image/png")})
                                              for _ in range(24)), return_exceptions=True)

        responses = asyncio.run(burst())
        assert httpx.get(f"{url}/readyz").status_code == 200
    assert all(isinstance(r, httpx.Response) for r in responses), [r for r in responses if not isinstance(r, httpx.Response)][:3]
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and set(statuses) == {200, 503}, statuses
    assert all(r.headers["Retry-After"] == "1" for r in responses if r.status_code == 503)


def test_a_request_past_its_deadline_gets_503(captioner):
    with serving(create_app(Slowed(captioner, 2.0), Limits(request_timeout_s=0.5))) as url:
        response = post(url, {"images": ("a.png", PNG, "image/png")})
    assert response.status_code == 503 and response.headers["Retry-After"], response.text


def test_max_batch_is_a_hard_cap_and_abandoned_requests_never_run():
    calls = []

    def run(key, items):
        calls.append(list(items))
        time.sleep(0.3)  # a slow forward: later requests queue up meanwhile
        return items

    async def scenario():
        batcher = MicroBatcher(run, max_batch=4, max_wait_ms=0)
        await batcher.start()
        first = asyncio.create_task(batcher.submit("k", ["first"]))
        await asyncio.sleep(0.05)  # the first batch is running
        kept = [asyncio.create_task(batcher.submit("k", [f"{i}a", f"{i}b", f"{i}c"])) for i in range(2)]
        big = asyncio.create_task(batcher.submit("k", [f"big{i}" for i in range(6)]))
        gone = asyncio.create_task(batcher.submit("k", ["gone"]))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client hung up while queued
        results = await asyncio.gather(first, *kept, big)
        await batcher.stop()
        return results, batcher.stats

    results, stats = asyncio.run(scenario())
    assert results[1] == ["0a", "0b", "0c"] and results[3] == [f"big{i}" for i in range(6)]
    # whole requests per batch, never more than 4 images; the 6-image request alone, in slices of 4
    assert calls == [["first"], ["0a", "0b", "0c"], ["1a", "1b", "1c"], [f"big{i}" for i in range(4)], ["big4", "big5"]], calls
    assert not any("gone" in c for c in calls) and stats.dropped == 1


def test_an_abandoned_http_request_is_dropped_from_the_queue(captioner):
    with serving(create_app(Slowed(captioner, 1.5), Limits(), max_wait_ms=0)) as url:

        async def scenario():
            async with httpx.AsyncClient(timeout=60) as client:
                first = asyncio.create_task(client.post(f"{url}/v1/captions", files={"images": ("a.png", PNG, "image/png")}))
                await asyncio.sleep(0.5)  # the first forward is running; the next ones queue behind it
                async with httpx.AsyncClient(timeout=0.5) as impatient:
                    gone = await asyncio.gather(*(impatient.post(f"{url}/v1/captions", files={"images": ("b.png", PNG, "image/png")})
                                                  for _ in range(3)), return_exceptions=True)
                return await first, gone

        first, gone = asyncio.run(scenario())
        assert first.status_code == 200 and all(isinstance(g, httpx.TimeoutException) for g in gone)
        time.sleep(2.0)  # the first batch ends; the worker finds the abandoned ones
        health = httpx.get(f"{url}/healthz").json()
    assert health["dropped_requests"] == 3 and health["images"] == 2, health  # the probe and the first request only


def test_an_image_that_breaks_the_model_fails_alone_as_json(captioner):
    white = encode(scene().point(lambda _: 255), "PNG")
    with serving(create_app(Slowed(captioner), Limits())) as url:
        response = post(url, [("images", ("ok.png", PNG, "image/png")), ("images", ("white.png", white, "image/png"))])
        assert response.status_code == 500 and response.headers["content-type"] == "application/json", response.text
        body = response.json()
        assert "white.png" in body["detail"] and "breaks the model" in body["detail"]
        ok, bad = body["results"]
        assert ok["caption"] and "caption" not in bad and "breaks the model" in bad["error"]
        assert post(url, {"images": ("ok.png", PNG, "image/png")}).status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 200  # the model itself is fine


def test_readiness_fails_when_the_worker_cannot_caption(captioner):
    app = create_app(captioner, Limits())
    with serving(app) as url:
        assert httpx.get(f"{url}/readyz").json() == {"status": "ready"}
        worker = app.state.batcher._worker
        worker.get_loop().call_soon_threadsafe(worker.cancel)  # the worker task ends, as a crash would end it
        time.sleep(0.2)
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and "stopped" in ready.json()["detail"]
        assert httpx.get(f"{url}/healthz").status_code == 200  # alive, but not ready
        refused = post(url, {"images": ("a.png", PNG, "image/png")})
        assert refused.status_code == 503 and "restarted" in refused.json()["detail"]

    class Broken(Slowed):
        def caption_pixels(self, pixels, decoding=None, attention=False):
            raise RuntimeError("CUDA error: an illegal memory access")

    with serving(create_app(Broken(captioner), Limits())) as url:
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and "illegal memory access" in ready.json()["detail"]


def test_an_api_key_guards_captions_but_not_the_page_or_probes(captioner):
    with serving(create_app(captioner, Limits(), api_key="s3cret")) as url:
        assert post(url, {"images": ("a.png", PNG, "image/png")}).status_code == 401
        assert post(url, {"images": ("a.png", PNG, "image/png")}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/openapi.json").status_code == 401
        assert post(url, {"images": ("a.png", PNG, "image/png")}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert post(url, {"images": ("a.png", PNG, "image/png")}, headers={"X-API-Key": "s3cret"}).status_code == 200
        for path in ("/", "/healthz", "/readyz"):
            assert httpx.get(f"{url}{path}").status_code == 200, path
        assert httpx.get(f"{url}/healthz").json()["api_key"] is True


def serve_cli(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner.serve", *overrides], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_listening_beyond_loopback_needs_a_key_or_allow_public(tmp_path):
    missing = tmp_path / "missing.ckpt"  # the checks before it fail first; past them, the missing file does
    refused = serve_cli(f"ckpt={missing}", "host=0.0.0.0")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "api_key" in refused.stderr and "allow_public=true" in refused.stderr
    for overrides, env in [(["allow_public=true"], None), (["api_key=k"], None), ([], {"CAPTIONER_API_KEY": "k"})]:
        passed = serve_cli(f"ckpt={missing}", "host=0.0.0.0", *overrides, env=env)
        assert passed.returncode == 2 and "does not exist" in passed.stderr and "api_key" not in passed.stderr, passed.stderr


def test_healthz_and_the_page_name_the_model_and_its_training_data(captioner, embedded_ckpt):
    model = describe_model(embedded_ckpt)
    assert model["mapper"] == "attention" and model["steps"] > 0
    assert model["trained_on"]["train_images"] == 64  # experiment=smoke's synthetic training split
    assert "synthetic shapes" in model["summary"] and "not photos" in model["summary"]
    with serving(create_app(captioner, Limits(), model=model)) as url:
        health = httpx.get(f"{url}/healthz").json()
        page = httpx.get(url).text
    assert health["model"]["summary"] == model["summary"] and health["prefix_length"] == model["prefix_length"]
    assert 'id="model"' in page and 'fetch("/healthz")' in page and "h.model.summary" in page


def test_a_worker_that_dies_mid_batch_answers_that_batch_at_once():
    class Fatal(BaseException):  # not an Exception: nothing in the worker may swallow it
        pass

    def run(key, items):
        raise Fatal

    async def scenario():
        batcher = MicroBatcher(run, max_batch=4, max_wait_ms=0)
        await batcher.start()
        began = time.monotonic()
        with pytest.raises(Busy, match="worker has stopped"):
            await asyncio.wait_for(batcher.submit("k", ["a", "b"]), timeout=5)
        waited, alive = time.monotonic() - began, batcher.alive
        await batcher.stop()
        return waited, alive

    waited, alive = asyncio.run(scenario())
    assert waited < 1 and not alive  # answered when the worker died, not at a deadline
