"""Token-for-token bridges of open vision-language models: every patch token (or block of them) becomes
one prefix embedding, with no learned slots.

- `mlp2x_gelu` is LLaVA-1.5's projector: Linear(W, D) -> GELU -> Linear(D, D) on each of the N patch
  tokens, so the prefix is N embeddings long.
- `pixel_shuffle` is nanoVLM's (Idefics3's) modality projector: space-to-depth of the g x g patch grid
  by a factor s (each s x s block of neighbouring tokens becomes one token s*s times as wide), then one
  bias-free Linear(W*s*s, D): N / s^2 embeddings.

Their prefix length is derived from the encoder's grid, not configured: `model.prefix_length` is read
only by mappers with learned slots (captioner/models/registry.py). Neither attends, so neither returns
attention maps: slot n reads patch (or block) n and nothing else.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from captioner.models.registry import Mapper


def gelu_mlp(first: nn.Linear, num_layers: int) -> nn.Sequential:
    """LLaVA's `mlp{N}x_gelu`: `first` (in -> D), then (GELU, Linear(D, D)) N-1 times; N=1 is its `linear`."""
    if num_layers < 1:
        raise ValueError(f"the projector needs num_layers >= 1, got {num_layers} (model.mapper.num_layers)")
    d = first.out_features
    return nn.Sequential(first, *(m for _ in range(num_layers - 1) for m in (nn.GELU(), nn.Linear(d, d))))


class TokenMLPMapper(Mapper, name="mlp2x_gelu"):
    """LLaVA-1.5's `mlp2x_gelu` over every patch token: (B, N, W) -> (B, N, D); prefix length N."""

    input_key = "patch_tokens"

    def __init__(self, in_dim: int, embed_dim: int, num_tokens: int, num_layers: int = 2):
        super().__init__()
        self.prefix_length = num_tokens
        self.projector = gelu_mlp(nn.Linear(in_dim, embed_dim), num_layers)  # LLaVA's mm_projector: projector.{0,2}.*

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projector(tokens)  # (B, N, D)


def pixel_shuffle(tokens: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """Space-to-depth of a row-major g x g token grid: (B, g*g, W) -> (B, (g/s)^2, W*s*s).

    Output token (i, j) is the s x s block of rows i*s..i*s+s-1 and columns j*s..j*s+s-1, its tokens
    concatenated row by row (nanoVLM's order); output tokens are again row-major."""
    b, n, w = tokens.shape
    g, s = math.isqrt(n), scale_factor
    x = tokens.reshape(b, g // s, s, g // s, s, w)  # (B, block row, row in block, block column, column in block, W)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (g // s) ** 2, s * s * w)


class PixelShuffleMapper(Mapper, name="pixel_shuffle"):
    """nanoVLM's modality projector: pixel shuffle by `scale_factor`, then Linear(W*s*s, D) without bias.

    `num_layers` above 1 follows the shuffle's Linear with (GELU, Linear(D, D)) pairs, as LLaVA's MLP does."""

    input_key = "patch_tokens"

    def __init__(self, in_dim: int, embed_dim: int, num_tokens: int, scale_factor: int = 2, num_layers: int = 1,
                 positions: bool = False):
        super().__init__()
        g = math.isqrt(num_tokens)
        if g * g != num_tokens:
            raise ValueError(f"the pixel_shuffle mapper needs a square patch grid; the encoder gives {num_tokens} tokens: "
                             f"choose another mapper (model/mapper=)")
        if not isinstance(scale_factor, int) or scale_factor < 1 or g % scale_factor:
            divisors = ", ".join(str(d) for d in range(1, g + 1) if g % d == 0)
            raise ValueError(f"model.mapper.scale_factor={scale_factor!r} does not divide the encoder's {g}x{g} patch "
                             f"grid: use one of {divisors}")
        self.scale_factor, self.prefix_length = scale_factor, num_tokens // scale_factor**2
        proj = nn.Linear(in_dim * scale_factor**2, embed_dim, bias=False)  # nanoVLM's MP.proj
        nn.init.normal_(proj.weight, mean=0.0, std=0.02)  # nanoVLM's initialisation
        self.projector = gelu_mlp(proj, num_layers)
        # positions: a learned embedding of each block's place, added after the first Linear. Before the MLP's
        # GELU it lets each prefix embedding code what is there jointly with where (docs/results/binding.md).
        self.position = nn.Parameter(torch.randn(self.prefix_length, embed_dim) * 0.02) if positions else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle(tokens, self.scale_factor)
        if self.position is None:
            return self.projector(x)  # (B, N/s^2, D)
        return self.projector[1:](self.projector[0](x) + self.position)
