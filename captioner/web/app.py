"""The FastAPI app: the captioning page, `POST /v1/captions`, `GET /healthz`, OpenAPI docs at /docs.

Every problem with what a client sends is a 4xx JSON `{"detail": "..."}` naming it; uploads stay
in memory (the body is capped while it is read) and are never written to disk.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from captioner.api import Captioner
from captioner.generate import Decoding
from captioner.web.batcher import MicroBatcher
from captioner.web.upload import UploadError, decode_image

DEFAULT = Decoding()  # the project's default decoding (captioner/generate.py)

STATIC = Path(__file__).parent / "static"
FIELD = "images"  # the multipart field that holds the files


@dataclass(frozen=True)
class Limits:
    max_body_mb: float = 32.0  # whole request; enforced while reading, so a bigger body is never buffered
    max_pixels: int = 50_000_000  # per image, from its header: a 48 MP phone photo passes, a bomb does not
    max_images: int = 16  # per request
    max_new_tokens: int = 60
    max_beams: int = 8


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


class InMemoryParser(MultiPartParser):
    spool_max_size = 2**40  # the body limit caps every file: they never roll over to a temporary file


def create_app(captioner: Captioner, limits: Limits = Limits(), max_batch: int = 16, max_wait_ms: float = 25.0) -> FastAPI:
    def run(key, pixels: list[torch.Tensor]):
        decoding, attention = key
        return captioner.caption_pixels(torch.stack(pixels), decoding, attention)  # (B, 3, R, R): one forward

    batcher = MicroBatcher(run, max_batch=max_batch, max_wait_ms=max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="captioner",
        description="Image captioning: CLIP image features -> mapper -> GPT-2. Post images to /v1/captions.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=int(limits.max_body_mb * 2**20))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": problems}, status_code=422)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", summary="Liveness, the model and the micro-batching counters")
    async def healthz():
        stats = batcher.stats
        return {
            "status": "ok",
            "resolution": captioner.resolution,
            "attention": captioner.has_attention,
            "precision": captioner.precision,
            "prefix_length": captioner.module.hparams.prefix_length,
            "batches": stats.batches,
            "images": stats.images,
            "largest_batch": stats.largest,
            "batch_sizes": stats.sizes,
            "forward_seconds": round(stats.seconds, 6),
        }

    @app.post(
        "/v1/captions",
        summary="Caption one or more images",
        description=f"multipart/form-data with one or more files in the field `{FIELD}` (or one image as the raw body). "
        "The type is read from the bytes; JPEG, PNG, GIF (first frame), WebP, BMP and TIFF are accepted.",
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
        attention: bool = Query(False, description="return where each prefix slot looked (attention mapper)"),
    ):
        start = time.perf_counter()
        batcher.arrive()
        try:
            try:
                files = await read_images(request, limits)
                decoded = await asyncio.to_thread(decode_all, files, captioner, limits)
            except UploadError as e:
                return JSONResponse({"detail": e.message}, status_code=e.status)
            finally:
                batcher.decoded()
            decoding = Decoding(strategy=strategy, num_beams=num_beams, max_new_tokens=max_new_tokens)
            if max_new_tokens > captioner.max_new_tokens:
                return JSONResponse({"detail": f"max_new_tokens: this model writes at most {captioner.max_new_tokens} tokens"}, 422)
            results = await batcher.submit((decoding, attention), [pixels for _, _, pixels in decoded])
        finally:
            batcher.answered()
        latency = round((time.perf_counter() - start) * 1000, 1)
        return {
            "results": [
                {"file": name, "caption": result.text, "latency_ms": latency, "width": size[0], "height": size[1]}
                | ({"attention": overlay(result.attention, size)} if result.attention is not None else {})
                | ({"retrieved": list(result.retrieved)} if result.retrieved is not None else {})
                for (name, size, _), result in zip(decoded, results)
            ],
            "latency_ms": latency,
            "decoding": asdict(decoding),
        }

    app.state.batcher = batcher
    return app


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


def decode_all(files: list[tuple[str, bytes]], captioner: Captioner, limits: Limits):
    """(name, (width, height), pixels (3, R, R)) per file; the first bad file fails the request."""
    decoded = []
    for name, data in files:
        image = decode_image(data, name, limits.max_pixels)
        try:
            pixels = captioner.preprocess(image)  # (3, R, R)
        except Exception as e:  # noqa: BLE001 - whatever a client's image does, it is a 4xx
            raise UploadError(400, f"{name}: the image cannot be prepared for the model ({e})") from None
        decoded.append((name, image.size, pixels))
    return decoded


def overlay(maps: torch.Tensor, size: tuple[int, int]) -> dict:
    """Attention maps (P, g, g) over CLIP's centre crop, placed in the original image's pixels."""
    side = min(size)
    crop = [(size[0] - side) / 2, (size[1] - side) / 2, side, side]  # CLIP resizes the short side, then centre-crops
    maps = maps / maps.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)  # each slot scaled to [0, 1]
    return {"crop": crop, "grid": maps.shape[-1], "maps": [[round(v, 3) for v in m.flatten().tolist()] for m in maps]}
