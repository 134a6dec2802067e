"""The frozen CLIP image encoder (OpenAI's `clip` package): pooled features and patch tokens."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import clip
import torch
from clip.model import CLIP, ModifiedResNet
from torch import nn

from captioner.models.hub import missing, reachable

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_clip(spec: str | Mapping, seed: int = 0) -> CLIP:
    """A string loads pretrained weights (a `clip` name such as `ViT-B/32`, or a local `.pt` file);
    a mapping of `clip.model.CLIP` arguments builds that architecture with seeded random weights."""
    if isinstance(spec, Mapping):
        torch.manual_seed(seed)
        args = dict(spec)
        if isinstance(args["vision_layers"], (list, tuple)):  # ResNets take a tuple of stage depths
            args["vision_layers"] = tuple(args["vision_layers"])
        return CLIP(**args).float()
    path = Path(spec).expanduser()
    if path.is_file():
        return clip.load(str(path), device="cpu", jit=False)[0].float()
    if spec not in clip.available_models():
        raise ValueError(
            f"CLIP model {spec!r} is neither a file nor one of {clip.available_models()} (model.encoder)"
        )
    cache = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(clip.clip._MODELS[spec])
    if not cache.is_file() and not reachable("openaipublic.azureedge.net"):
        raise missing("CLIP", spec, "model.encoder", "openaipublic.azureedge.net")
    return clip.load(spec, device="cpu", jit=False)[0].float()


class ClipEncoder(nn.Module):
    """Frozen CLIP: `forward(pixels)` -> {"clip_features": (B, E), "patch_tokens": (B, N, W)}.

    For ViTs the patch tokens are the last layer's tokens after `ln_post` and the projection (W = E);
    for ResNets they are the final feature grid before attention pooling (W = channels).
    """

    def __init__(self, spec: str | Mapping, precision: str = "fp32", seed: int = 0):
        super().__init__()
        model = load_clip(spec, seed)
        self.visual = model.visual
        self.text = model  # kept for text-only training: encode_text uses the text tower
        self.dtype = DTYPES[precision]
        self.to(self.dtype)
        self.requires_grad_(False)
        self.eval()
        self.resolution = self.visual.input_resolution
        self.embed_dim = model.text_projection.shape[1]
        if isinstance(self.visual, ModifiedResNet):
            self.token_dim = self.visual.attnpool.k_proj.in_features
            self.num_tokens = (self.resolution // 32) ** 2
        else:
            self.token_dim = self.embed_dim
            self.num_tokens = (self.resolution // self.visual.conv1.kernel_size[0]) ** 2

    def train(self, mode: bool = True) -> "ClipEncoder":
        return super().train(False)  # frozen: always in eval mode, whatever the Trainer asks

    @property
    def preprocess(self):
        return clip.clip._transform(self.resolution)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = pixels.to(self.dtype)
        if isinstance(self.visual, ModifiedResNet):
            return self._resnet(pixels)
        v = self.visual
        x = v.conv1(pixels)  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1+N, W)
        x = v.ln_pre(x)
        x = v.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # clip's transformer is (L, B, W)
        x = v.ln_post(x) @ v.proj  # (B, 1+N, E)
        return {"clip_features": x[:, 0].float(), "patch_tokens": x[:, 1:].float()}

    def _resnet(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        v = self.visual
        x = v.relu1(v.bn1(v.conv1(pixels)))
        x = v.relu2(v.bn2(v.conv2(x)))
        x = v.avgpool(v.relu3(v.bn3(v.conv3(x))))
        grid = v.layer4(v.layer3(v.layer2(v.layer1(x))))  # (B, C, h, w)
        pooled = v.attnpool(grid)  # (B, E)
        return {"clip_features": pooled.float(), "patch_tokens": grid.flatten(2).transpose(1, 2).float()}

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP text embeddings (B, E), for training on captions alone (CapDec)."""
        tokens = clip.tokenize(texts, context_length=self.text.context_length, truncate=True)
        return self.text.encode_text(tokens).float()
