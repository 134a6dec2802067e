"""Tiny random vision towers saved as a user has them, and the `model.encoder` spec that names each.

open_clip: a model config (as open_clip's model_configs/*.json) and a checkpoint file written with torch.save of
the state dict, which `pretrained=FILE` reads; its SigLIP is SigLIP's own timm trunk (no class token, MAP pooling)
at toy size, described by a timm `local-dir:` config. transformers: `save_pretrained` directories with the image
processor and a tokenizer beside the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SIZE, PATCH, WIDTH = 32, 8, 32  # a 4x4 grid of 8-pixel patches
TEXT = {"context_length": 16, "vocab_size": 49408, "width": WIDTH, "heads": 2, "layers": 1}


def open_clip_vit_config() -> dict:
    return {"embed_dim": WIDTH, "vision_cfg": {"image_size": SIZE, "layers": 2, "width": WIDTH, "head_width": 16, "patch_size": PATCH},
            "text_cfg": dict(TEXT)}


def open_clip_siglip_config(folder: Path) -> dict:
    """ViT-B-16-SigLIP's config (open_clip/model_configs) at toy size: timm's SigLIP ViT with 2 blocks."""
    trunk = folder / "timm_siglip"
    trunk.mkdir(parents=True, exist_ok=True)
    (trunk / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_siglip_224",
        "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "mean": [0.5] * 3, "std": [0.5] * 3},
        "model_args": {"img_size": SIZE, "patch_size": PATCH, "embed_dim": WIDTH, "depth": 2, "num_heads": 2},
    }))
    return {"embed_dim": WIDTH, "init_logit_bias": -10, "custom_text": True,
            "vision_cfg": {"image_size": SIZE, "timm_model_name": f"local-dir:{trunk}", "timm_model_pretrained": False,
                           "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": {**TEXT, "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}}


def save_open_clip(folder: Path, config: dict, seed: int = 1) -> dict:
    """A random open_clip model of `config`, its state dict saved as a checkpoint file; the spec loading it."""
    from captioner.models.open_clip_tower import load_open_clip

    model = load_open_clip({"config": config, "seed": seed})
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "open_clip_model.pt")
    return {"source": "open_clip", "config": config, "checkpoint": str(folder / "open_clip_model.pt")}


def _tokenizer(path: Path) -> None:
    """A small word-level tokenizer, saved as transformers reads one (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", "a", "an", "the", "photo", "of", "red", "blue", "green", "circle", "square",
             "triangle", "left", "right", "top", "bottom", "and", "in", "on", "with", "man", "dog", "cat", "on"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", vocab["[EOS]"])])  # CLIP pools there
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]").save_pretrained(path)


def save_transformers(folder: Path, family: str, seed: int = 1, vision_only: bool = False) -> dict:
    """A random CLIPModel / SiglipModel (or its vision model alone) saved with its image processor and tokenizer."""
    import transformers

    text = {"vocab_size": 64, "hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16,
            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # the tokenizer's ids
    vision = {"image_size": SIZE, "patch_size": PATCH, "hidden_size": WIDTH, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2}
    torch.manual_seed(seed)
    if family == "clip":
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=WIDTH)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
        model = transformers.CLIPVisionModel(config.vision_config) if vision_only else transformers.CLIPModel(config)
    else:
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
        processor = transformers.SiglipImageProcessor(size={"height": SIZE, "width": SIZE})
        model = transformers.SiglipVisionModel(config.vision_config) if vision_only else transformers.SiglipModel(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if not vision_only:
        _tokenizer(folder)
    return {"source": "transformers", "path": str(folder)}
