"""Uploaded bytes -> an upright RGB image, or an `UploadError` (a 4xx naming the problem).

The type is sniffed from the bytes by PIL, never from the file name; the pixel count is read from
the header and checked before any pixel is decoded, so a decompression bomb costs nothing; `decoded_bytes`
says, from the header too, how much memory the decode will take (the server's budget counts it).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from captioner.data.images import MAX_ASPECT, upright_rgb

# what we accept: the formats browsers and phones produce (HEIC needs a plugin PIL lacks)
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
OPENED_AS = (*FORMATS, "MPO")  # the JPEG plugin opens multi-picture JPEGs (some phones) as MPO


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# bytes a pixel PIL stores per mode (others: one a band); "I;16" also passes through an int64 array
STORED = {"RGB": 4, "RGBX": 4, "YCbCr": 4, "LAB": 4, "HSV": 4, "I": 4, "F": 4, "I;16": 10, "I;16B": 10, "I;16L": 10}


def decoded_bytes(data: bytes, name: str = "upload", max_pixels: int = 50_000_000) -> int:
    """Peak memory of decoding `data`, from its header alone: the decoded image and its RGB copy (4 bytes
    a pixel in PIL). A 7000x7000 1-bit PNG of 6 KB costs 245 MB (measured: 233 MiB). UploadError as decode_image."""
    with _opened(data, name, max_pixels) as image:
        width, height = image.size
        return width * height * (STORED.get(image.mode, len(image.getbands())) + 4)


def decode_image(data: bytes, name: str = "upload", max_pixels: int = 50_000_000) -> Image.Image:
    """Decode one uploaded image; every failure is an UploadError with a 4xx status."""
    with _opened(data, name, max_pixels) as image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return upright_rgb(image)  # decodes here: truncation and corruption surface now
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadError(413, f"{name}: too many pixels; send at most {max_pixels:,}") from None
        except Exception as e:  # noqa: BLE001 - corrupt data raises OSError, SyntaxError, ValueError, ...
            raise UploadError(400, f"{name}: the {image.format} data is truncated or corrupt ({e})") from None


def _opened(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """The image with its header read and checked (format, pixel count, shape); no pixel decoded yet."""
    if not data:
        raise UploadError(400, f"{name}: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise UploadError(415, f"{name}: not an image PIL can read; send one of {', '.join(FORMATS)}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(413, f"{name}: too many pixels; send at most {max_pixels:,}") from None
    except Exception as e:  # noqa: BLE001 - a malformed header may raise anything inside a plugin
        raise UploadError(400, f"{name}: the image header is malformed ({e})") from None
    try:
        if image.format not in OPENED_AS:
            raise UploadError(415, f"{name}: {image.format} images are not supported; send one of {', '.join(FORMATS)}")
        width, height = image.size
        if width * height > max_pixels:  # checked from the header, before decoding
            raise UploadError(413, f"{name}: {width}x{height} is {width * height:,} pixels; send at most {max_pixels:,}")
        if width < 1 or height < 1:
            raise UploadError(400, f"{name}: the image has no pixels ({width}x{height})")
        if max(width, height) > MAX_ASPECT * min(width, height):  # CLIP's resize would blow it up
            raise UploadError(400, f"{name}: {width}x{height} is too elongated to caption (aspect ratio over {MAX_ASPECT}:1); crop it")
    except UploadError:
        image.close()
        raise
    return image
