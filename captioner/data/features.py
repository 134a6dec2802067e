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
Writing (resume, bad images, shards) lives in extraction.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from captioner.data.coco import ImageRecord

STORE_VERSION = 1
BAD_IMAGE_POLICIES = ("stop", "skip")


class StaleStoreError(RuntimeError):
    """A store on disk was made with other settings or other images than the ones asked for."""


class BadImagesError(ValueError):
    """Images that are missing or cannot be decoded; what was extracted stays on disk."""


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
    """The content hash of an encoder given as a local file (a pretrained or user CLIP), else None:
    a file rebuilt at the same path makes new features, not a silently stale store."""
    if not isinstance(encoder_spec, (str, os.PathLike)) or not Path(encoder_spec).expanduser().is_file():
        return None
    path = Path(encoder_spec).expanduser().resolve()
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def store_key(records: Sequence[ImageRecord], encoder_spec) -> str:
    """The name of a split's store in the cache directory: image ids and names (a replaced corrupt file
    resumes the same store) and the encoder (another CLIP, or a rebuilt pretrained one, gets its own)."""
    identity = json.dumps([identity_hash(records), encoder_spec, encoder_digest(encoder_spec)], default=str, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def _plain(value):
    if isinstance(value, Mapping):
        return dict(value)
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else str(value)


def describe(records: Sequence[ImageRecord], encoder_spec, precision: str, resolution: int, split: str, dtype: str, tokens: bool) -> dict:
    spec = json.loads(json.dumps(encoder_spec, default=_plain))  # OmegaConf/tuples -> plain JSON
    return {
        "version": STORE_VERSION,
        "encoder": spec,
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


def differences(found: Mapping, wanted: Mapping) -> list[str]:
    out = []
    for key in wanted:
        if found.get(key) != wanted[key]:
            if key == "image_ids":
                out.append(f"image_ids ({len(found.get(key) or [])} stored vs {len(wanted[key])} wanted)")
            else:
                out.append(f"{key} (stored {found.get(key)!r} vs wanted {wanted[key]!r})")
    return out


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
        self.manifest = json.loads((self.directory / "manifest.json").read_text())
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

    @classmethod
    def open_or_extract(
        cls,
        directory: str | Path,
        records: Sequence[ImageRecord],
        encoder_factory,
        encoder_spec,
        split: str,
        precision: str = "fp32",
        dtype: str = "fp16",
        tokens: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        bad_images: str = "stop",  # stop: raise listing the bad files; skip: leave them out, report the count
        device: str | torch.device = "cpu",
        rank: int = 0,  # a distributed run: every process calls this with its rank and a barrier
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
    ) -> "FeatureStore":
        """Open the store at `directory`, extracting (or finishing) it first when needed.

        `encoder_factory()` builds the ClipEncoder; it is called only when there is work to do.
        A store made with other settings is refused with the list of differences.
        """
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r} (data.bad_images)")
        directory = Path(directory)
        manifest = directory / "manifest.json"
        if manifest.exists():
            found = json.loads(manifest.read_text())
            wanted = describe(records, encoder_spec, precision, 0, split, dtype, tokens)
            wanted["preprocessing"] = found.get("preprocessing")  # resolution is read from the model only when extracting
            diff = differences(found, wanted)
            if diff:
                raise StaleStoreError(
                    f"feature store {directory} was made with other settings: {'; '.join(diff)}. "
                    f"Delete the directory to re-extract, or point data.cache_dir elsewhere."
                )
            return cls(directory)
        encoder = encoder_factory().to(device)
        wanted = describe(records, encoder_spec, precision, encoder.resolution, split, dtype, tokens)
        shapes = {"clip_features": (encoder.embed_dim,)}
        if tokens:
            shapes["patch_tokens"] = (encoder.num_tokens, encoder.token_dim)
        from captioner.data.extraction import Extraction  # the writer imports this module's manifest helpers

        job = Extraction(records, encoder, wanted, shapes, batch_size, num_workers, device, rank)
        if world_size == 1:
            job.run(directory, bad_images)
        else:
            job.run_sharded(directory, bad_images, rank, world_size, barrier or (lambda: None))
        if not manifest.exists():  # stopped on bad images: their list is in progress.json
            bad = {int(k): v for k, v in json.loads((directory / "progress.json").read_text())["bad"].items()}
            raise BadImagesError(_bad_message(directory, records, bad))
        return cls(directory)


def _bad_message(directory: Path, records: Sequence[ImageRecord], bad: Mapping[int, str]) -> str:
    listed = "\n".join(f"  {records[i].path}: {reason}" for i, reason in sorted(bad.items())[:50])
    more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
    return (
        f"{len(bad)} of {len(records)} images could not be read:\n{listed}{more}\n"
        f"The other images' features are kept in {directory}. Replace or remove these files and run again "
        f"(only they are encoded), or set data.bad_images=skip to leave them out."
    )
