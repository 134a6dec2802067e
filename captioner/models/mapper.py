"""Mappers: CLIP image features -> a prefix of P GPT-2 input embeddings, shape (B, P, D).

Each mapper registers itself (captioner/models/registry.py) and names the feature it reads
(`input_key`): the pooled CLIP vector (`clip_features`, (B, E)) or the patch tokens (`patch_tokens`,
(B, N, W)). `mlp` and `transformer` are ClipCap's mappers with ClipCap's parameter names, so its
checkpoints load key for key; `attention` is the patch-token mapper that lets a prefix slot look at
one region of the image. LLaVA's and nanoVLM's bridges are in captioner/models/bridges.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from captioner.models.registry import MAPPERS, Mapper, build_mapper  # noqa: F401 - the registry, where callers look


class MLPMapper(Mapper, name="mlp"):
    """ClipCap's MLP: Linear(E, P*D/2) -> Tanh -> Linear(P*D/2, P*D), reshaped to (P, D).

    `num_layers` sets the depth: 2 is ClipCap's (its `model.0` / `model.2` keys); each further layer
    adds a Tanh and a Linear(P*D/2, P*D/2) in the middle; 1 is a single Linear(E, P*D).
    """

    input_key = "clip_features"

    def __init__(self, in_dim: int, embed_dim: int, prefix_length: int, num_layers: int = 2):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the MLP mapper needs num_layers >= 1, got {num_layers} (model.mapper.num_layers)")
        self.prefix_length, self.embed_dim = prefix_length, embed_dim
        hidden = embed_dim * prefix_length // 2
        sizes = [in_dim] + [hidden] * (num_layers - 1) + [embed_dim * prefix_length]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features).view(-1, self.prefix_length, self.embed_dim)  # (B, P, D)


class ClipCapAttention(nn.Module):
    """ClipCap's multi-head attention: bias-free queries, keys+values from one Linear of 2D outputs."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)  # rows [0, D) keys, [D, 2D) values
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.to_queries(x).view(b, n, h, c // h).transpose(1, 2)  # (B, H, N, C/H)
        kv = self.to_keys_values(x).view(b, n, 2, h, c // h)  # (B, N, 2, H, C/H)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, N, C/H)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, C/H)
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class ClipCapMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class ClipCapLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ClipCapAttention(dim, num_heads)
        self.mlp = ClipCapMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClipCapTransformer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int, mlp_ratio: float):
        super().__init__()
        self.layers = nn.ModuleList(ClipCapLayer(dim, num_heads, mlp_ratio) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(Mapper, name="transformer"):
    """ClipCap's transformer mapper: the CLIP vector becomes L tokens, a learned constant (P, D) is
    appended, N layers mix them, and the last P positions are the prefix. No positional embeddings,
    no dropout, no final norm: exactly ClipCap's, so its checkpoints reproduce its logits."""

    input_key = "clip_features"

    def __init__(
        self,
        in_dim: int,
        embed_dim: int,
        prefix_length: int,
        clip_length: int | None = None,  # ClipCap used clip_length = prefix_length
        num_layers: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 2.0,
    ):
        super().__init__()
        self.clip_length = clip_length or prefix_length
        self.linear = nn.Linear(in_dim, self.clip_length * embed_dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, embed_dim))
        self.transformer = ClipCapTransformer(embed_dim, num_heads, num_layers, mlp_ratio)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.linear(features).view(features.shape[0], self.clip_length, -1)  # (B, L, D)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, P, D)
        return self.transformer(torch.cat((x, prefix), dim=1))[:, self.clip_length :]  # (B, P, D)


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: queries attend to the image tokens, then to each other, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_self, self.norm_mlp = (nn.LayerNorm(dim) for _ in range(4))
        self.cross = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, memory: torch.Tensor, need_weights: bool = False):
        kv = self.norm_kv(memory)
        attended, weights = self.cross(self.norm_q(q), kv, kv, need_weights=need_weights)  # weights (B, P, N)
        q = q + attended
        s = self.norm_self(q)
        q = q + self.self_attn(s, s, s, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q)), weights


def sincos_2d(num_tokens: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(N, D) fixed 2-D sin-cos positions of a square grid flattened row by row (MAE's table):
    the first half of the channels encodes the row, the second the column, each as sin | cos of
    D/4 frequencies from 1 to 1/temperature. Each row has unit L2 norm, like the normalised CLIP
    tokens it is added to after their projection: at MAE's scale (entries of +-1) it drowns them."""
    g = math.isqrt(num_tokens)
    if g * g != num_tokens or dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a square grid and a width divisible by 4, got {num_tokens} tokens of width {dim}")
    omega = temperature ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(g, dtype=torch.float64), torch.arange(g, dtype=torch.float64), indexing="ij")
    parts = []
    for axis in (rows.flatten(), cols.flatten()):
        angle = axis[:, None] * omega[None]  # (N, D/4)
        parts += [angle.sin(), angle.cos()]
    return (torch.cat(parts, dim=1) / math.sqrt(dim / 2)).float()  # (N, D), each row of norm 1


POSITIONS = ("learned", "sincos2d", "learned_sincos2d")


class AttentionMapper(Mapper, name="attention"):
    """P learned queries attend over the CLIP patch tokens (the flagship mapper).

    A frozen CLIP's pooled vector can lose where things are; its patch tokens keep it. Each prefix
    slot is a query that can attend to different image regions, and `return_attention=True` gives
    those maps, (B, P, N) head-averaged from the last layer, for overlays.

    `position` is the table added to every projected token, so keys and values say which patch a
    token came from: `learned` starts at zero and is trained, `sincos2d` is the fixed 2-D sin-cos
    table (not trained), `learned_sincos2d` starts from it and is trained. The table is the same
    parameter (`token_position`) in each case, so any checkpoint loads into any setting.
    """

    input_key = "patch_tokens"
    returns_attention = True

    def __init__(
        self,
        token_dim: int,
        embed_dim: int,
        prefix_length: int,
        num_tokens: int,  # patches per image, read from the encoder
        num_layers: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        position: str = "learned",
    ):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"unknown token position table {position!r}: choose one of {list(POSITIONS)} (model.mapper.position)")
        self.proj = nn.Linear(token_dim, embed_dim)
        table = torch.zeros(num_tokens, embed_dim) if position == "learned" else sincos_2d(num_tokens, embed_dim)
        self.token_position = nn.Parameter(table, requires_grad=position != "sincos2d")  # which patch a token came from
        self.queries = nn.Parameter(torch.randn(prefix_length, embed_dim) * 0.02)
        self.layers = nn.ModuleList(CrossAttentionBlock(embed_dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, tokens: torch.Tensor, return_attention: bool = False):
        memory = self.proj(tokens) + self.token_position  # (B, N, D)
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B, P, D)
        weights = None
        for i, layer in enumerate(self.layers):
            q, weights = layer(q, memory, need_weights=return_attention and i == len(self.layers) - 1)
        prefix = self.norm(q)
        return (prefix, weights) if return_attention else prefix


def attention_grid(weights: torch.Tensor) -> torch.Tensor:
    """(B, P, N) attention over patch tokens -> (B, P, g, g) maps laid out like the image.

    Both encoders flatten their grid row by row (`flatten(2)` of (B, C, g, g)), so token n is cell
    (n // g, n % g): upsample a map to the image size and it lies over the patches it weighs."""
    b, p, n = weights.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} patch tokens do not form a square grid")
    return weights.reshape(b, p, g, g)  # (B, P, g, g)

