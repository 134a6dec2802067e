"""Vision towers by source: one builder per library, one contract (captioner/models/tower.py).

    model.encoder: ViT-B/32                                      # OpenAI `clip`: a name or a local .pt file
    model.encoder: {vision_layers: 2, ...}                       # OpenAI `clip` at any size, random (zoo.py)
    model.encoder: {source: open_clip, name: ViT-B-16-SigLIP, checkpoint: FILE, layer: -1}
    model.encoder: {source: transformers, path: DIR, layer: -2}

A string or a mapping without `source` is OpenAI's `clip` (captioner/models/encoder.py); `source: open_clip` and
`source: transformers` are described in open_clip_tower.py and transformers_tower.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from captioner.models.encoder import ClipEncoder
from captioner.models.open_clip_tower import OpenClipTower
from captioner.models.transformers_tower import TransformersTower

SOURCES = {"clip": ClipEncoder, "open_clip": OpenClipTower, "transformers": TransformersTower}


def source_of(spec) -> str:
    if not isinstance(spec, Mapping) or "source" not in spec:
        return "clip"
    if spec["source"] not in SOURCES:
        raise ValueError(f"model.encoder.source={spec['source']!r}: choose one of {sorted(SOURCES)}")
    return spec["source"]


def build_encoder(spec, precision: str = "fp32"):
    """The frozen tower `spec` names or builds, in eval mode, with every dimension read from it."""
    source = source_of(spec)
    if source == "clip":
        return ClipEncoder({k: v for k, v in spec.items() if k != "source"} if isinstance(spec, Mapping) else spec, precision)
    return SOURCES[source](spec, precision)


def random_tower(spec) -> bool:
    """Whether `spec` builds its tower from sizes alone (no file, no download): such a build can run on the
    meta device to compare a checkpoint's shapes before anything is allocated."""
    if not isinstance(spec, Mapping):
        return False
    if source_of(spec) == "clip":
        return spec.get("name") is None
    return "config" in spec and not weight_files(spec)


def weight_files(spec) -> list[Path]:
    """The local files a tower spec loads its weights from (a feature store hashes them: a file rebuilt at the same
    path makes new features); published names and random towers name none."""
    if isinstance(spec, Mapping):
        named = [spec.get(k) for k in ("checkpoint", "path", "name")]  # a published name is no file: skipped below
        paths = [Path(str(p)).expanduser() for p in named if p]
    else:
        paths = [Path(str(spec)).expanduser()]
    files = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():  # a save_pretrained directory: its weights and configs
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".pt"))
    return files
