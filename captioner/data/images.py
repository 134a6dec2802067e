"""Image decoding, shared by extraction, the Python API, the web upload and the sample grid.

Every image, whatever its file format or mode, becomes upright 8-bit RGB; a file that cannot be
decoded, or whose shape is absurd, raises ValueError naming it, so callers can skip it or report it in
one line. The shape is read from the header and checked before a pixel is decoded.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

ImageLike = str | Path | Image.Image | torch.Tensor
# CLIP resizes the short side to its resolution: a 50000x1 image would become 11 million x 224
MAX_ASPECT = 50


# what PIL raises for truncated, corrupt or non-image data, and for an image over Image.MAX_IMAGE_PIXELS
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError)


class ImageShapeError(ValueError):
    """An image whose shape cannot be captioned (too elongated, empty)."""


def load_image(path: str | Path) -> Image.Image:
    """Any image file as upright RGB: EXIF orientation applied; grayscale, palette, CMYK, alpha and
    16-bit converted. Raises ValueError naming the file when it is missing, cannot be decoded, holds
    more pixels than PIL's decompression-bomb limit, or is too elongated to caption."""
    return decode(path, path)


def decode(source: str | Path | BinaryIO, name) -> Image.Image:
    """`load_image` for a path or an open binary file, errors naming `name` (a path, `shard#key`)."""
    try:
        with Image.open(source) as image:
            check_shape(image.size, name)  # from the header: a 50000x1 PNG is refused before it is decoded
            return upright_rgb(image)
    except FileNotFoundError:
        raise ValueError(f"image {name} does not exist") from None
    except ImageShapeError:
        raise
    except DECODE_ERRORS as e:
        raise ValueError(f"image {name} cannot be decoded ({type(e).__name__}: {e}); remove or replace it") from None


def upright_rgb(image: Image.Image) -> Image.Image:
    """An opened image as upright 8-bit RGB (first frame; alpha composited on white). Decodes pixels."""
    image.seek(0)  # first frame of an animation
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
        pixels = np.asarray(image).astype(np.int64)
        image = Image.fromarray((pixels >> 8 if pixels.max() > 255 else pixels).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def to_pil(image: ImageLike) -> Image.Image:
    """Upright RGB from a path (any format PIL reads), a PIL image, or an image tensor.

    A tensor is an image as torchvision reads it: (C, H, W) with C = 1 or 3, uint8 in [0, 255] or
    float in [0, 1], at any size; it is resized and normalised like a file."""
    if isinstance(image, (str, Path)):
        return check_aspect(load_image(image), image)
    if isinstance(image, Image.Image):
        return check_aspect(upright_rgb(image), "image")
    if isinstance(image, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image

        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be (C, H, W) with C = 1 or 3, got shape {tuple(image.shape)}")
        if image.is_floating_point() and (image.min() < 0 or image.max() > 1):
            raise ValueError("a float image tensor must hold values in [0, 1] (or pass uint8 in [0, 255])")
        return check_aspect(to_pil_image(image.cpu()).convert("RGB"), "tensor")
    raise TypeError(f"cannot caption a {type(image).__name__}: pass a path, a PIL image or a (C, H, W) tensor")


def check_shape(size: tuple[int, int], name) -> None:
    w, h = size
    if min(w, h) < 1:
        raise ImageShapeError(f"image {name}: {w}x{h} has no pixels")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageShapeError(f"image {name}: {w}x{h} is too elongated to caption (aspect ratio over {MAX_ASPECT}:1); crop it")


def check_aspect(image: Image.Image, name) -> Image.Image:
    check_shape(image.size, name)
    return image
