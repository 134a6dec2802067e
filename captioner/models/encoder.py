"""The frozen CLIP encoders (OpenAI's `clip` package): pooled features, patch tokens, text embeddings.

Every OpenAI CLIP works by name (RN50, RN101, RN50x4, RN50x16, RN50x64, ViT-B/32, ViT-B/16, ViT-L/14,
ViT-L/14@336px), by local `.pt` file, or at any size with random weights (a mapping of `clip.model.CLIP`
arguments, optionally `arch: NAME` for a published size; see `captioner/models/zoo.py`). Every dimension
is read from the loaded model. A ViT's patch tokens come from its last block unless the spec names another
(`{name: ViT-B/32, layer: -2}`, or `layer:` beside the sizes of a random build).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# clip/clip.py imports `packaging` through pkg_resources, which setuptools deprecates: nothing a user can
# change here, and clip reads only `packaging.version` from it
warnings.filterwarnings("ignore", message="pkg_resources is deprecated as an API", category=UserWarning, module=r"clip\.clip")
import clip  # noqa: E402
from clip.model import CLIP, ModifiedResNet, build_model  # noqa: E402

from captioner.models.hub import missing, reachable
from captioner.models.tower import block_index
from captioner.models.zoo import CLIP_ARCHS, resolve

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_of(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[precision]


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds its code (`<name>/code/...`); a state dict saved by torch.save does not."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def clip_name(spec) -> str | None:
    """The published name or local file an OpenAI-clip spec loads (the string itself, or a mapping's `name`);
    None for a random build or a tower of another source."""
    if isinstance(spec, (str, os.PathLike)):
        return str(spec)
    if isinstance(spec, Mapping) and spec.get("source", "clip") == "clip" and spec.get("name") is not None:
        return str(spec["name"])
    return None


def renamed(spec, name: str):
    """`spec` loading `name` instead, with everything else (its `layer`) kept."""
    return name if isinstance(spec, (str, os.PathLike)) else {**spec, "name": name}


def split_layer(spec: str | Mapping) -> tuple[str | Mapping, int]:
    """(what `load_clip` reads, the block whose patch tokens are read: -1 unless the spec says `layer:`)."""
    if not isinstance(spec, Mapping):
        return spec, -1
    rest = {k: v for k, v in spec.items() if k not in ("layer", "source")}
    layer = spec.get("layer", -1)
    if "name" in rest:
        if len(rest) > 1:
            raise ValueError(f"model.encoder: a named CLIP takes `name` and `layer` only, not {sorted(set(rest) - {'name'})}")
        return str(rest["name"]), layer
    return rest, layer


def load_clip(spec: str | Mapping, seed: int | None = None) -> CLIP:
    """A string loads pretrained weights (a `clip` name such as `ViT-B/32`, or a local `.pt` file);
    a mapping of `clip.model.CLIP` arguments builds that architecture with seeded random weights.

    The seed of random weights belongs to the spec (its `seed` key, else 0), not to the training run:
    the feature store's encoder and the module's must be one network, and the store records the spec."""
    if isinstance(spec, Mapping):
        args = resolve(spec, CLIP_ARCHS, "model.encoder")
        spec_seed = args.pop("seed", 0)
        if isinstance(args["vision_layers"], (list, tuple)):  # ResNets take a tuple of stage depths
            args["vision_layers"] = tuple(args["vision_layers"])
        with torch.random.fork_rng(devices=[]):  # seeded weights without moving the run's random stream
            torch.manual_seed(spec_seed if seed is None else seed)
            return CLIP(**args).float()
    path = Path(spec).expanduser()
    if path.is_file():
        if _is_torchscript(path):  # OpenAI's releases are TorchScript archives
            with warnings.catch_warnings():  # torch deprecates jit.load; OpenAI's files need it
                warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated", category=FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:  # a plain state dict (a pretrained tiny CLIP, a converted release)
            state = torch.load(path, map_location="cpu", weights_only=True)
        return build_model(dict(state)).float()  # every size read from the tensors
    if spec not in clip.available_models():
        raise ValueError(
            f"CLIP model {spec!r} is neither a file nor one of {clip.available_models()} (model.encoder)"
        )
    cache = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(clip.clip._MODELS[spec])
    if not cache.is_file() and not reachable("openaipublic.azureedge.net"):
        raise missing("CLIP", spec, "model.encoder", "openaipublic.azureedge.net")
    return clip.load(spec, device="cpu", jit=False)[0].float()


def cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """OpenAI's mixed precision, for any dtype: convolutions, linear and attention weights and the
    projections take `dtype`; LayerNorm, BatchNorm and embeddings stay fp32 (clip's LayerNorm computes
    in fp32 and casts back), as in `clip.model.convert_weights`, which knows only fp16."""

    def cast(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
        if isinstance(module, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
                tensor = getattr(module, name)
                if tensor is not None:
                    tensor.data = tensor.data.to(dtype)
        for name in ("text_projection", "proj"):
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor):
                tensor.data = tensor.data.to(dtype)

    model.apply(cast)


class ClipText(nn.Module):
    """CLIP's text tower alone (the image tower lives in `ClipEncoder.visual`): captions -> (B, E)."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.context_length = model.context_length
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer  # its blocks hold the causal mask
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.text_projection.dtype
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding.to(dtype)  # (B, C, W)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # clip's transformer is (C, B, W)
        x = self.ln_final(x)
        # the end-of-text token (the highest id in each row) summarises the caption
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection  # (B, E)


class ClipEncoder(nn.Module):
    """Frozen CLIP: `forward(pixels)` -> {"clip_features": (B, E), "patch_tokens": (B, N, W)}.

    For ViTs the patch tokens are a block's tokens after `ln_post` and the projection (W = E): the last
    block's by default, so `clip_features` (always exactly CLIP's `encode_image`) and the tokens share one
    space; `layer: k` reads block k's output through the same `ln_post` and projection. For ResNets they
    are the final feature grid before attention pooling (N = (resolution/32)^2, W = its channels).
    """

    source = "clip"
    has_text = True

    def __init__(self, spec: str | Mapping, precision: str = "fp32", seed: int | None = None):
        super().__init__()
        if precision not in DTYPES:  # before CLIP loads
            raise ValueError(f"encoder precision {precision!r}: choose one of {sorted(DTYPES)} (model.encoder_precision)")
        spec, layer = split_layer(spec)
        model = load_clip(spec, seed)
        self.visual = model.visual
        self.text = ClipText(model)  # text-only training (CapDec) embeds captions with it
        self.set_precision(precision)
        self.requires_grad_(False)
        self.eval()
        v = self.visual
        self.resolution = v.input_resolution
        self.embed_dim = v.output_dim
        if isinstance(v, ModifiedResNet):
            if layer != -1:
                raise ValueError(f"model.encoder.layer={layer!r}: a ResNet CLIP gives its final feature grid only; drop `layer`")
            self.layer = -1
            self.token_dim = v.attnpool.k_proj.in_features
            self.num_tokens = v.attnpool.positional_embedding.shape[0] - 1  # grid cells, without the mean token
        else:
            depth = len(v.transformer.resblocks)
            self.layer = block_index(layer, depth)
            self.token_dim = v.output_dim
            self.num_tokens = v.positional_embedding.shape[0] - 1  # patches, without the class token

    def set_precision(self, precision: str) -> "ClipEncoder":
        """Cast the weights (in place) to `precision`, OpenAI's way: see `cast_weights`."""
        self.dtype = dtype_of(precision)
        cast_weights(self, self.dtype)
        return self

    def train(self, mode: bool = True) -> "ClipEncoder":
        return super().train(False)  # frozen: always in eval mode, whatever the Trainer asks

    @property
    def preprocess(self):
        return clip.clip._transform(self.resolution)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = pixels.to(self.visual.conv1.weight.device, self.dtype)
        if isinstance(self.visual, ModifiedResNet):
            return self._resnet(pixels)
        v = self.visual
        x = v.conv1(pixels)  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1+N, W)
        x = v.ln_pre(x).permute(1, 0, 2)  # clip's transformer is (L, B, W)
        for i, block in enumerate(v.transformer.resblocks):  # what clip's transformer runs, block by block
            x = block(x)
            if i == self.layer:
                chosen = x
        x = v.ln_post(x.permute(1, 0, 2)) @ v.proj  # (B, 1+N, E): the class token is encode_image
        # an earlier block's tokens go through the same ln_post and projection
        chosen = x if self.layer == len(v.transformer.resblocks) - 1 else v.ln_post(chosen.permute(1, 0, 2)) @ v.proj
        return {"clip_features": x[:, 0].float(), "patch_tokens": chosen[:, 1:].float()}

    def _resnet(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        v = self.visual
        x = v.relu1(v.bn1(v.conv1(pixels)))
        x = v.relu2(v.bn2(v.conv2(x)))
        x = v.avgpool(v.relu3(v.bn3(v.conv3(x))))
        grid = v.layer4(v.layer3(v.layer2(v.layer1(x))))  # (B, C, h, w)
        pooled = v.attnpool(grid)  # (B, E)
        return {"clip_features": pooled.float(), "patch_tokens": grid.flatten(2).transpose(1, 2).float()}  # (B, h*w, C)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP text embeddings (B, E), for training on captions alone (CapDec)."""
        tokens = clip.tokenize(texts, context_length=self.text.context_length, truncate=True)
        return self.text(tokens.to(self.text.token_embedding.weight.device)).float()
