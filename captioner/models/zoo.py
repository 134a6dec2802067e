"""The published architectures by name, so each can be built at full size with random weights.

`CLIP_ARCHS[name]` holds the exact `clip.model.CLIP(...)` arguments that `clip.model.build_model`
reads from OpenAI's checkpoint of that name; `GPT2_ARCHS[name]` the `GPT2Config` fields of the Hugging
Face model of that name. A model spec that is a mapping may name one as `arch:` and override fields:

    model.encoder={arch: ViT-B/32}                 # full-size ViT-B/32, random weights
    model.decoder={arch: gpt2-medium, n_layer: 4}  # GPT-2 medium's width, 4 layers
"""

from __future__ import annotations

from collections.abc import Mapping

_CLIP_TEXT = {"context_length": 77, "vocab_size": 49408, "transformer_layers": 12}

CLIP_ARCHS: dict[str, dict] = {
    # ResNets: vision_layers are the four stage depths; the attention-pooled grid has width*32 channels
    "RN50": {"embed_dim": 1024, "image_resolution": 224, "vision_layers": (3, 4, 6, 3), "vision_width": 64,
             "vision_patch_size": None, "transformer_width": 512, "transformer_heads": 8, **_CLIP_TEXT},
    "RN101": {"embed_dim": 512, "image_resolution": 224, "vision_layers": (3, 4, 23, 3), "vision_width": 64,
              "vision_patch_size": None, "transformer_width": 512, "transformer_heads": 8, **_CLIP_TEXT},
    "RN50x4": {"embed_dim": 640, "image_resolution": 288, "vision_layers": (4, 6, 10, 6), "vision_width": 80,
               "vision_patch_size": None, "transformer_width": 640, "transformer_heads": 10, **_CLIP_TEXT},
    "RN50x16": {"embed_dim": 768, "image_resolution": 384, "vision_layers": (6, 8, 18, 8), "vision_width": 96,
                "vision_patch_size": None, "transformer_width": 768, "transformer_heads": 12, **_CLIP_TEXT},
    "RN50x64": {"embed_dim": 1024, "image_resolution": 448, "vision_layers": (3, 15, 36, 10), "vision_width": 128,
                "vision_patch_size": None, "transformer_width": 1024, "transformer_heads": 16, **_CLIP_TEXT},
    # ViTs: (resolution / patch)^2 patch tokens of width vision_width, projected to embed_dim
    "ViT-B/32": {"embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768,
                 "vision_patch_size": 32, "transformer_width": 512, "transformer_heads": 8, **_CLIP_TEXT},
    "ViT-B/16": {"embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768,
                 "vision_patch_size": 16, "transformer_width": 512, "transformer_heads": 8, **_CLIP_TEXT},
    "ViT-L/14": {"embed_dim": 768, "image_resolution": 224, "vision_layers": 24, "vision_width": 1024,
                 "vision_patch_size": 14, "transformer_width": 768, "transformer_heads": 12, **_CLIP_TEXT},
    "ViT-L/14@336px": {"embed_dim": 768, "image_resolution": 336, "vision_layers": 24, "vision_width": 1024,
                       "vision_patch_size": 14, "transformer_width": 768, "transformer_heads": 12, **_CLIP_TEXT},
}

# GPT2Config's defaults (gelu_new, layer_norm_epsilon 1e-5, dropouts 0.1) are GPT-2's own; only size differs
GPT2_ARCHS: dict[str, dict] = {
    "gpt2": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-large": {"n_embd": 1280, "n_layer": 36, "n_head": 20, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-xl": {"n_embd": 1600, "n_layer": 48, "n_head": 25, "n_positions": 1024, "vocab_size": 50257},
    "distilgpt2": {"n_embd": 768, "n_layer": 6, "n_head": 12, "n_positions": 1024, "vocab_size": 50257},
}


def resolve(spec: Mapping, archs: Mapping[str, Mapping], config_key: str) -> dict:
    """A mapping spec with its `arch:` name expanded: the named arguments, then the spec's overrides."""
    args = dict(spec)
    name = args.pop("arch", None)
    if name is None:
        return args
    if name not in archs:
        raise ValueError(f"unknown architecture {name!r} in {config_key}.arch: choose one of {sorted(archs)}")
    return {**archs[name], **args}
