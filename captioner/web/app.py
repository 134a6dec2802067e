"""The FastAPI app: the captioning page, `POST /v1/captions`, `GET /healthz` (liveness and the model),
`GET /readyz` (can it caption), OpenAPI docs at /docs.

Every problem with what a client sends is a 4xx JSON `{"detail": "..."}` naming it; uploads stay
in memory (the body is capped while it is read) and are never written to disk. A full server answers
503 with Retry-After; the bounds are in captioner/web/limits.py.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from captioner.api import Captioner
from captioner.generate import Decoding
from captioner.web.batcher import Busy, MicroBatcher
from captioner.web.limits import ApiKey, BodyLimit, DecodeBudget, Limits, RequestLimit
from captioner.web.upload import UploadError, decode_image, decoded_bytes

DEFAULT = Decoding()  # the project's default decoding (captioner/generate.py)

STATIC = Path(__file__).parent / "static"
FIELD = "images"  # the multipart field that holds the files


class InMemoryParser(MultiPartParser):
    spool_max_size = 2**40  # the body limit caps every file: they never roll over to a temporary file


def create_app(captioner: Captioner, limits: Limits = Limits(), max_batch: int = 16, max_wait_ms: float = 25.0,
               api_key: str | None = None, model: dict | None = None) -> FastAPI:
    """The app around a loaded captioner. `model` describes it for the page and /healthz
    (captioner/web/identity.py); `api_key` set: every request but the page and the probes needs it."""
    def run(key, pixels: list[torch.Tensor]):
        decoding, attention = key
        return captioner.caption_pixels(torch.stack(pixels), decoding, attention)  # (B, 3, R, R): one forward

    batcher = MicroBatcher(run, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queued=limits.max_queued_images)
    budget_bytes = int(limits.decode_budget_mb * 2**20)
    budget = DecodeBudget(budget_bytes)
    decoder_pool = ThreadPoolExecutor(max_workers=limits.decode_threads, thread_name_prefix="decode")
    model = model or {"summary": "unknown (the app was given no model description)"}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        probe = torch.zeros(3, captioner.resolution, captioner.resolution)  # a blank image: can the model caption?
        try:
            await batcher.submit((Decoding(max_new_tokens=1), False), [probe])
        except Exception:  # noqa: BLE001 - the failure is kept in batcher.failure, which /readyz reports
            pass
        yield
        await batcher.stop()
        decoder_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="captioner",
        description="Image captioning: CLIP image features -> mapper -> GPT-2. Post images to /v1/captions.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(RequestLimit, limit=limits.max_requests)
    app.add_middleware(BodyLimit, limit=int(limits.max_body_mb * 2**20))  # outermost: it caps what RequestLimit drains
    if api_key:
        app.add_middleware(ApiKey, key=api_key)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": problems}, status_code=422)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", summary="Liveness, the model, what it was trained on, and the counters")
    async def healthz():
        stats = batcher.stats
        return {
            "status": "ok",
            "model": model,
            "resolution": captioner.resolution,
            "attention": captioner.has_attention,
            "precision": captioner.precision,
            "prefix_length": model.get("prefix_length"),
            "api_key": bool(api_key),
            "batches": stats.batches,
            "images": stats.images,
            "largest_batch": stats.largest,
            "batch_sizes": stats.sizes,
            "forward_seconds": round(stats.seconds, 6),
            "dropped_requests": stats.dropped,
            "failed_forwards": stats.failed,
            "queued_images": batcher.queued,
            "decode_bytes_held": budget.used,
            "decode_bytes_peak": budget.peak,
        }

    @app.get("/readyz", summary="Readiness: 200 while the worker can caption, 503 with the reason when not")
    async def readyz():
        if not batcher.alive:
            return JSONResponse({"status": "unavailable", "detail": "the captioning worker has stopped"}, 503)
        if batcher.failure is not None:
            return JSONResponse({"status": "unavailable", "detail": f"the last forward pass failed: {batcher.failure}"}, 503)
        return {"status": "ready"}

    async def decode(name: str, data: bytes):
        """(name, (width, height), pixels (3, R, R)) once the decode's memory fits the budget."""
        cost = decoded_bytes(data, name, limits.max_pixels)  # from the header, before any pixel is decoded
        if cost > budget_bytes:
            raise UploadError(413, f"{name}: decoding it takes {cost / 2**20:.0f} MB, over the server's "
                                   f"{limits.decode_budget_mb:.0f} MB budget; send a smaller image")
        await budget.acquire(cost)
        loop = asyncio.get_running_loop()
        try:
            work = decoder_pool.submit(decode_one, name, data, captioner, limits)
        except BaseException:
            budget.release(cost)
            raise
        # released when the decode ends, not when its caller gives up: the thread holds the pixels until then
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(budget.release, cost))
        return await asyncio.wrap_future(work)

    async def answer(files, key, decoded_all) -> tuple[list, list]:
        try:
            decoded = [await decode(name, data) for name, data in files]
        finally:
            decoded_all()
        return decoded, await batcher.submit(key, [pixels for _, _, pixels in decoded])

    @app.post(
        "/v1/captions",
        summary="Caption one or more images",
        description=f"multipart/form-data with one or more files in the field `{FIELD}` (or one image as the raw body). "
        "The type is read from the bytes; JPEG, PNG, GIF (first frame), WebP, BMP and TIFF are accepted. "
        "503 with Retry-After when the server is full or past the request's deadline.",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": [FIELD],
                            "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}},
                        }
                    }
                },
            }
        },
    )
    async def captions(
        request: Request,
        strategy: Literal["greedy", "beam"] = Query(DEFAULT.strategy, description="greedy or beam search"),
        num_beams: int = Query(DEFAULT.num_beams, ge=2, le=limits.max_beams, description="beam width (beam only)"),
        max_new_tokens: int = Query(DEFAULT.max_new_tokens, ge=1, le=limits.max_new_tokens),
        attention: bool = Query(False, description="return where each prefix slot looked (a mapper that returns maps; /healthz says whether this one does)"),
    ):
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.request_timeout_s
        if max_new_tokens > captioner.max_new_tokens:
            return JSONResponse({"detail": f"max_new_tokens: this model writes at most {captioner.max_new_tokens} tokens"}, 422)
        decoding = Decoding(strategy=strategy, num_beams=num_beams, max_new_tokens=max_new_tokens)
        decoding_done = False

        def decoded_all():  # once per request, whichever way it ends
            nonlocal decoding_done
            if not decoding_done:
                decoding_done = True
                batcher.decoded()

        batcher.arrive()
        try:
            try:
                files = await asyncio.wait_for(read_images(request, limits), limits.request_timeout_s)
            except UploadError as e:
                return JSONResponse({"detail": e.message}, status_code=e.status)
            except TimeoutError:
                return JSONResponse({"detail": f"the body took over {limits.request_timeout_s:g} s to arrive"}, 408)
            work = asyncio.create_task(answer(files, (decoding, attention), decoded_all))
            gone = asyncio.create_task(disconnected(request))
            await asyncio.wait({work, gone}, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not work.done():
                work.cancel()  # its queued request is dropped; a decode under way finishes, then frees its budget
                if gone.done() and not gone.cancelled():
                    return Response(status_code=499)  # the client hung up: nobody reads this
                retry = batcher.retry_after()
                return JSONResponse({"detail": f"no answer within {limits.request_timeout_s:g} s; the server is busy, retry later"},
                                    503, headers={"Retry-After": str(retry)})
            try:
                decoded, results = work.result()
            except UploadError as e:
                return JSONResponse({"detail": e.message}, status_code=e.status)
            except Busy as e:
                return JSONResponse({"detail": e.message}, 503, headers={"Retry-After": str(e.retry_after)})
        finally:
            decoded_all()
            batcher.answered()
        latency = round((time.perf_counter() - start) * 1000, 1)
        failed = [(name, r) for (name, _, _), r in zip(decoded, results) if isinstance(r, Exception)]
        body = {
            "results": [result_json(name, size, result, latency) for (name, size, _), result in zip(decoded, results)],
            "latency_ms": latency,
            "decoding": asdict(decoding),
        }
        if failed:  # the other images of the batch were captioned; these could not be, even alone
            body["detail"] = "; ".join(f"{name}: the model failed on it ({type(r).__name__}: {r})" for name, r in failed)
            return JSONResponse(body, 500)
        return body

    app.state.batcher, app.state.budget = batcher, budget
    return app


async def disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body is read by then, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def result_json(name: str, size: tuple[int, int], result, latency: float) -> dict:
    if isinstance(result, Exception):
        return {"file": name, "error": f"{type(result).__name__}: {result}", "width": size[0], "height": size[1]}
    return (
        {"file": name, "caption": result.text, "latency_ms": latency, "width": size[0], "height": size[1]}
        | ({"attention": overlay(result.attention, size)} if result.attention is not None else {})
        | ({"retrieved": list(result.retrieved)} if result.retrieved is not None else {})
    )


async def read_images(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """(name, bytes) per uploaded image, from a multipart form or a raw image body."""
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        if content_type.startswith(b"image/") or content_type == b"application/octet-stream":
            return [("body", await request.body())]
        raise UploadError(
            415, f"send multipart/form-data with the images in the field '{FIELD}' (got Content-Type {content_type.decode() or 'none'!r})"
        )
    try:
        parser = InMemoryParser(request.headers, request.stream(), max_files=limits.max_images, max_fields=16)
        form = await parser.parse()
    except MultiPartException as e:
        raise UploadError(400, f"malformed multipart body: {e.message}") from None
    except HTTPException:
        raise
    except Exception as e:  # noqa: BLE001 - python-multipart raises several types for broken bodies
        raise UploadError(400, f"malformed multipart body ({type(e).__name__}: {e})") from None
    uploads = form.getlist(FIELD)
    if not uploads:
        fields = sorted(set(form.keys()))
        raise UploadError(422, f"no file in the form field '{FIELD}' (got fields: {fields or 'none'}); send the images as '{FIELD}'")
    if any(not isinstance(u, UploadFile) for u in uploads):
        raise UploadError(422, f"the form field '{FIELD}' must hold files, not text")
    return [(u.filename or f"{FIELD}[{i}]", await u.read()) for i, u in enumerate(uploads)]


def decode_one(name: str, data: bytes, captioner: Captioner, limits: Limits):
    """(name, (width, height), pixels (3, R, R)); a bad file is an UploadError that fails its request."""
    image = decode_image(data, name, limits.max_pixels)
    try:
        pixels = captioner.preprocess(image)  # (3, R, R)
    except Exception as e:  # noqa: BLE001 - whatever a client's image does, it is a 4xx
        raise UploadError(400, f"{name}: the image cannot be prepared for the model ({e})") from None
    return name, image.size, pixels


def overlay(maps: torch.Tensor, size: tuple[int, int]) -> dict:
    """Attention maps (P, g, g) over CLIP's centre crop, placed in the original image's pixels."""
    side = min(size)
    crop = [(size[0] - side) / 2, (size[1] - side) / 2, side, side]  # CLIP resizes the short side, then centre-crops
    maps = maps / maps.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)  # each slot scaled to [0, 1]
    return {"crop": crop, "grid": maps.shape[-1], "maps": [[round(v, 3) for v in m.flatten().tolist()] for m in maps]}
