"""What every frozen vision tower shares: the contract the model core, feature stores, CLIPScore, retrieval and
text-only training read, and the checks a tower spec passes before any weights load.

A tower gives `forward(pixels) -> {"clip_features": (B, E), "patch_tokens": (B, N, W)}` (the pooled image
embedding, and the patch tokens of one layer without class or register tokens), `embed_dim` (E),
`token_dim` (W), `num_tokens` (N, exactly the patch grid), `resolution`, `preprocess` (PIL image -> (3, H, W)
tensor, the model's own), `encode_text(texts) -> (B, E)` where it has a text tower, and `set_precision`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_of(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[precision]


class NoTextTowerError(ValueError):
    """The tower embeds images only: CLIPScore, retrieval and text-only training need its text embeddings."""


def block_index(layer: int, depth: int, spec_key: str = "model.encoder.layer") -> int:
    """The 0-based block whose output `layer` names: -1 is the last block, 0 the first (Python's indexing)."""
    if not isinstance(layer, int) or isinstance(layer, bool) or not -depth <= layer < depth:
        raise ValueError(f"{spec_key}={layer!r}: this tower has {depth} blocks, choose an index in [{-depth}, {depth - 1}] (-1: the last)")
    return layer % depth


def local_file(spec: Mapping, key: str, what: str) -> Path:
    """The file or directory `spec[key]` names, or one line saying it is not there."""
    path = Path(str(spec[key])).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model.encoder.{key}: {what} {path} does not exist; point it at the {what} you saved")
    return path


class Tower(nn.Module):
    """A frozen tower holding one library model (`self.model`): always in eval mode, never trained."""

    source = ""
    has_text = False

    def __init__(self, spec: Mapping, precision: str):
        super().__init__()
        if precision not in DTYPES:  # before any weights load
            raise ValueError(f"encoder precision {precision!r}: choose one of {sorted(DTYPES)} (model.encoder_precision)")
        # plain containers all the way down: open_clip and transformers test for dict, not Mapping
        self.spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else copy.deepcopy(dict(spec))

    def _finish(self, precision: str, depth: int) -> None:
        """Freeze, cast, pick the layer and read every dimension from one forward of a blank image."""
        self.layer = block_index(self.spec.get("layer", -1), depth)
        self.depth = depth
        self.model.requires_grad_(False)
        self.set_precision(precision)
        self.eval()
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.forward(torch.zeros(1, 3, self.resolution, self.resolution, device=device))
        self.embed_dim = out["clip_features"].shape[-1]
        self.num_tokens, self.token_dim = out["patch_tokens"].shape[1:]
        grid = self.grid()
        if self.num_tokens != grid[0] * grid[1]:  # a class or register token left in, or one dropped
            raise ValueError(f"{self.describe()}: {self.num_tokens} patch tokens for a {grid[0]}x{grid[1]} grid")

    def grid(self) -> tuple[int, int]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.source} tower {self.spec.get('name') or self.spec.get('path') or 'from a config'}"

    def set_precision(self, precision: str) -> "Tower":
        self.dtype = dtype_of(precision)
        self.model.to(self.dtype)
        return self

    def train(self, mode: bool = True) -> "Tower":
        return super().train(False)  # frozen: always in eval mode, whatever the Trainer asks

    def _device_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(next(self.model.parameters()).device, self.dtype)

    def refuse_text(self, why: str) -> NoTextTowerError:
        return NoTextTowerError(
            f"{self.describe()} {why}: CLIPScore, retrieval and text-only training need a tower with a text part "
            "(clipscore.model=... names another CLIP for CLIPScore)"
        )
