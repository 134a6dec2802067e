"""The feature store: each image encoded once by the frozen CLIP, kept in memory-mappable files.

A store is a directory:
    manifest.json        what was encoded and how (written last: its presence means complete)
    clip_features.npy    (N, E) pooled CLIP features
    patch_tokens.npy     (N, T, W) patch tokens (optional)
and, while extraction runs (removed once it completes):
    pending.json         the manifest to write + each image file's size (a replaced file is re-encoded)
    done.npy             (N,) uint8, 1 once row i is on disk: a killed run resumes from it
    progress.json        {"rows": rows done, "bad": {row: reason}}, rewritten after every batch
    shards/R-of-W/       one partial store per process of a distributed run; rank 0 merges them
Row i belongs to `manifest["image_ids"][i]`; readers pair captions with features by image id.
Writing (resume, bad images, shards) lives in extraction.py, which imports this module, never the
reverse: opening a store reads it and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from captioner.data.coco import ImageRecord
from captioner.data.manifest import MANIFEST, plain
from captioner.models.towers import weight_files

STORE_VERSION = 1


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else -1


def content_hash(records: Sequence[ImageRecord]) -> str:
    """Image ids, file names and sizes: changes when the image set changes."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.image_id}\t{r.path.name}\t{file_size(r.path)}\n".encode())
    return h.hexdigest()


def identity_hash(records: Sequence[ImageRecord]) -> str:
    """Image ids and file names only: a store keyed by it survives a corrupt file being replaced."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.image_id}\t{r.path.name}\n".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encoder_digest(encoder_spec) -> str | None:
    """The content hash of the local files an encoder loads (a pretrained or user CLIP file, an open_clip
    checkpoint, a save_pretrained directory), else None: a file rebuilt at the same path makes new features,
    not a silently stale store."""
    files = weight_files(encoder_spec)
    if not files:
        return None
    digests = []
    for path in files:
        path = path.resolve()
        stat = path.stat()
        digests.append(_file_sha256(str(path), stat.st_size, stat.st_mtime_ns))
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def store_key(images: str, encoder_spec) -> str:
    """The name of a split's store in the cache directory from what names its images (`identity_hash`
    of its records: a replaced corrupt file resumes the same store; or its shard list) and the encoder
    (another CLIP, or a rebuilt pretrained one, gets a store of its own)."""
    # plain(): a spec given as an OmegaConf mapping names the same store as the same spec as a dict
    identity = json.dumps([images, plain(encoder_spec), encoder_digest(encoder_spec)], default=str, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def describe(records: Sequence[ImageRecord], encoder_spec, precision: str, resolution: int, split: str, dtype: str, tokens: bool) -> dict:
    return {
        "version": STORE_VERSION,
        "encoder": plain(encoder_spec),  # OmegaConf/tuples -> plain JSON
        "encoder_sha256": encoder_digest(encoder_spec),
        "precision": precision,
        "preprocessing": f"clip bicubic resize + centre crop {resolution}, CLIP mean/std",
        "normalisation": "none (raw CLIP outputs; the model normalises)",
        "dtype": dtype,
        "split": split,
        "patch_tokens": tokens,
        "count": len(records),
        "image_ids": [r.image_id for r in records],
        "content_hash": content_hash(records),
    }


RELEASE_SPAN = 1 << 20  # covers the kernel's fault-around (64 KiB by default), which maps a read's neighbours too


def _release(array: np.memmap, i: int) -> None:
    """Drop the pages around row i from this process's mapping. A mapped page counts in the RSS
    until it is released, so an epoch over a store bigger than RAM would otherwise grow to the
    store's size; the pages stay in the page cache, so reading them again is a minor fault, not I/O."""
    mm = getattr(array, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    row_bytes = array.strides[0]
    begin = array.offset % mmap.ALLOCATIONGRANULARITY + i * row_bytes  # np.memmap maps from a granule boundary
    first = begin - begin % RELEASE_SPAN
    last = min(-(-(begin + row_bytes) // RELEASE_SPAN) * RELEASE_SPAN, len(mm))
    mm.madvise(mmap.MADV_DONTNEED, first, last - first)


class FeatureStore:
    """Read side: memory-maps the arrays and copies out one row at a time; nothing is loaded whole."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / MANIFEST).read_text())
        self.image_ids: list[int] = self.manifest["image_ids"]
        self.skipped: set[int] = set(self.manifest.get("skipped", []))  # unreadable images, no features
        self.row = {image_id: i for i, image_id in enumerate(self.image_ids) if image_id not in self.skipped}
        self.clip_features = np.load(self.directory / "clip_features.npy", mmap_mode="r")
        tokens = self.directory / "patch_tokens.npy"
        self.patch_tokens = np.load(tokens, mmap_mode="r") if self.manifest["patch_tokens"] else None

    def __len__(self) -> int:
        return len(self.row)

    def features(self, image_id: int) -> dict[str, torch.Tensor]:
        i = self.row[image_id]
        out = {}
        for name, array in (("clip_features", self.clip_features), ("patch_tokens", self.patch_tokens)):
            if array is not None:
                out[name] = torch.from_numpy(np.array(array[i], dtype=np.float32))
                _release(array, i)
        return out
