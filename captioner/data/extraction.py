"""Writing a feature store (`open_or_extract`): batched CLIP encoding that resumes after a kill, keeps going past
unreadable images, and shards across processes (the layout is in features.py).

Batches are fixed chunks of `batch_size` consecutive rows, whoever encodes them and however often
the run was interrupted, so a resumed or sharded store equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.data.coco import ImageRecord
from captioner.data.images import load_image
from captioner.data.features import FeatureStore, content_hash, describe, file_size
from captioner.data.disk import new_arrays
from captioner.data.manifest import (
    MANIFEST, StaleStoreError, check_manifest, differences, read_manifest, refuse_complete, sole_writer, write_json,
)

log = logging.getLogger(__name__)
BAD_IMAGE_POLICIES = ("stop", "skip")


class BadImagesError(ValueError):
    """Images that are missing or cannot be decoded; what was extracted stays on disk."""


def open_or_extract(
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
) -> FeatureStore:
    """The store at `directory`, extracted (or finished) first when needed.

    `encoder_factory()` builds the ClipEncoder; it is called only when there is work to do.
    A store made with other settings is refused with the list of differences.
    """
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r} (data.bad_images)")
    directory = Path(directory)
    with sole_writer(directory, rank, world_size, barrier):
        found = read_manifest(directory)
        if found is not None:
            wanted = describe(records, encoder_spec, precision, 0, split, dtype, tokens)
            wanted["preprocessing"] = found.get("preprocessing")  # resolution is read from the model only when extracting
            check_manifest(directory, wanted, "feature store", "Delete the directory to re-extract, or point data.cache_dir elsewhere.")
            return FeatureStore(directory)
        encoder = encoder_factory().to(device)
        wanted = describe(records, encoder_spec, precision, encoder.resolution, split, dtype, tokens)
        shapes = {"clip_features": (encoder.embed_dim,)}
        if tokens:
            shapes["patch_tokens"] = (encoder.num_tokens, encoder.token_dim)
        job = Extraction(records, encoder, wanted, shapes, batch_size, num_workers, device, rank)
        if world_size == 1:
            job.run(directory, bad_images)
        else:
            job.run_sharded(directory, bad_images, rank, world_size, barrier or (lambda: None))
        if not (directory / MANIFEST).exists():  # stopped on bad images: their list is in progress.json
            bad = {int(k): v for k, v in json.loads((directory / "progress.json").read_text())["bad"].items()}
            raise BadImagesError(_bad_message(directory, records, bad))
        return FeatureStore(directory)


def _bad_message(directory: Path, records: Sequence[ImageRecord], bad: Mapping[int, str]) -> str:
    listed = "\n".join(f"  {records[i].path}: {reason}" for i, reason in sorted(bad.items())[:50])
    more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
    return (
        f"{len(bad)} of {len(records)} images could not be read:\n{listed}{more}\n"
        f"The other images' features are kept in {directory}. Replace or remove these files and run again "
        f"(only they are encoded), or set data.bad_images=skip to leave them out."
    )


class _Images(Dataset):
    """Row -> (row, preprocessed pixels or None, why it failed or None)."""

    def __init__(self, records: Sequence[ImageRecord], preprocess):
        self.records, self.preprocess = records, preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.records[i].path)
            return i, self.preprocess(ImageOps.mirror(image) if self.records[i].mirrored else image), None
        except ValueError as e:
            return i, None, str(e)


def _collate(items):
    good = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [i for i, _ in good], pixels, {i: error for i, _, error in items if error is not None}


class Extraction:
    """Encodes records into partial stores: in place (one process) or as shards merged by rank 0."""

    def __init__(self, records, encoder, manifest: dict, shapes: dict, batch_size: int, num_workers: int, device, rank: int):
        self.records, self.encoder, self.manifest, self.shapes = records, encoder, manifest, shapes
        self.batch_size, self.num_workers, self.device, self.rank = batch_size, num_workers, device, rank
        self.np_dtype = np.float16 if manifest["dtype"] == "fp16" else np.float32

    def chunks(self, rows: Sequence[int]) -> list[list[int]]:
        return [list(rows[s : s + self.batch_size]) for s in range(0, len(rows), self.batch_size)]

    def open(self, directory: Path, records, manifest: dict, strict: bool = True, extra: Mapping | None = None):
        """The partial store's arrays and done mask, resumed when its pending.json matches."""
        pending = directory / "pending.json"
        sizes = [file_size(r.path) for r in records]
        if pending.exists():
            state = json.loads(pending.read_text())
            diff = differences(state["manifest"], {k: v for k, v in manifest.items() if k != "content_hash"})
            if not diff and all(state.get(k) == v for k, v in (extra or {}).items()):
                arrays = {name: np.lib.format.open_memmap(directory / f"{name}.npy", mode="r+") for name in self.shapes}
                done = np.lib.format.open_memmap(directory / "done.npy", mode="r+")
                changed = np.flatnonzero(np.asarray(state["sizes"]) != np.asarray(sizes))
                if len(changed):  # files replaced since they were encoded: encode them again
                    done[changed] = 0
                    write_json(pending, {**state, "manifest": manifest, "sizes": sizes})
                return arrays, done
            if strict:
                raise StaleStoreError(
                    f"partly extracted store {directory} was started with other settings: {'; '.join(diff)}. "
                    f"Delete the directory to start over, or point data.cache_dir elsewhere."
                )
            shutil.rmtree(directory)
        refuse_complete(directory)
        specs = {name: (self.np_dtype, (len(records), *shape)) for name, shape in self.shapes.items()}
        arrays = new_arrays(directory, {**specs, "done": (np.uint8, (len(records),))}, f"feature store {directory}")
        done = arrays.pop("done")
        write_json(pending, {"manifest": manifest, "sizes": sizes, **(extra or {})})
        return arrays, done

    def encode(self, directory: Path, records, arrays: dict, done: np.ndarray, batches: list[list[int]]) -> dict[int, str]:
        """Encode the rows of `batches` not yet done; returns the unreadable rows with the reason."""
        todo = [b for b in ([i for i in batch if not done[i]] for batch in batches) if b]
        loader = DataLoader(
            _Images(records, self.encoder.preprocess),
            batch_sampler=todo,
            num_workers=self.num_workers,
            collate_fn=_collate,
        )
        bad: dict[int, str] = {}
        desc = f"extract {self.manifest['split']}" + (f" [rank {self.rank}]" if self.rank else "")
        with tqdm(total=len(records), initial=int(done.sum()), desc=desc, unit="img", position=self.rank) as bar:
            for rows, pixels, errors in loader:
                bad.update(errors)
                if rows:
                    out = self.encoder(pixels.to(self.device))
                    for name, array in arrays.items():
                        array[rows] = out[name].cpu().numpy().astype(self.np_dtype)
                    done[rows] = 1  # after the rows: a kill in between encodes this batch again
                write_json(directory / "progress.json", {"rows": int(done.sum()), "bad": bad})
                bar.update(len(rows) + len(errors))
        for array in (*arrays.values(), done):
            array.flush()
        write_json(directory / "progress.json", {"rows": int(done.sum()), "bad": bad})
        return bad

    def run(self, directory: Path, bad_images: str) -> None:
        arrays, done = self.open(directory, self.records, self.manifest)
        bad = self.encode(directory, self.records, arrays, done, self.chunks(range(len(self.records))))
        missing = np.flatnonzero(done[:] == 0)
        del arrays, done
        self.finish(directory, missing, bad, bad_images)

    def run_sharded(self, directory: Path, bad_images: str, rank: int, world_size: int, barrier) -> None:
        """Rank r encodes every world_size-th pending chunk into shards/r-of-W; rank 0 merges."""
        if rank == 0 and (directory / "pending.json").exists():
            self.open(directory, self.records, self.manifest)  # checks settings, marks replaced files undone
        barrier()
        done = np.zeros(len(self.records), np.uint8)
        if (directory / "done.npy").exists():  # rows an earlier run finished are not encoded again
            done = np.load(directory / "done.npy")
        pending = [[i for i in c if not done[i]] for c in self.chunks(range(len(self.records)))]
        mine = [c for c in pending if c][rank::world_size]
        rows = [i for c in mine for i in c]
        shard = directory / "shards" / f"{rank}-of-{world_size}"
        records = [self.records[i] for i in rows]
        manifest = {**self.manifest, "split": f"{self.manifest['split']} shard {rank}/{world_size}", "count": len(rows),
                    "image_ids": [r.image_id for r in records], "content_hash": content_hash(records)}
        arrays, shard_done = self.open(shard, records, manifest, strict=False, extra={"rows": rows})
        starts = np.cumsum([0] + [len(c) for c in mine])
        self.encode(shard, records, arrays, shard_done, [list(range(s, s + len(c))) for s, c in zip(starts, mine)])
        del arrays, shard_done
        barrier()
        if rank == 0:
            self.merge(directory, world_size, bad_images)
        barrier()

    def merge(self, directory: Path, world_size: int, bad_images: str) -> None:
        """The shards into the store; a store already complete (written by another job meanwhile) is left
        exactly as it is and only the shards are dropped."""
        if read_manifest(directory) is not None:
            log.warning("feature store %s was completed by another run: its shards are dropped, the store is kept", directory)
            shutil.rmtree(directory / "shards", ignore_errors=True)
            return
        arrays, done = self.open(directory, self.records, self.manifest)
        finished, bad = [], {}
        for shard in sorted((directory / "shards").glob(f"*-of-{world_size}")):
            rows = np.asarray(json.loads((shard / "pending.json").read_text())["rows"], dtype=np.int64)
            local = np.flatnonzero(np.load(shard / "done.npy"))
            for name, array in arrays.items():
                source = np.load(shard / f"{name}.npy", mmap_mode="r")
                for s in range(0, len(local), 1024):  # blockwise: a shard may not fit in RAM
                    block = local[s : s + 1024]
                    array[rows[block]] = source[block]
            finished.append(rows[local])
            bad.update({int(rows[int(k)]): v for k, v in json.loads((shard / "progress.json").read_text())["bad"].items()})
        for rows in finished:  # only once every row is copied: a kill before this keeps the shards usable
            done[rows] = 1
        for array in (*arrays.values(), done):
            array.flush()
        write_json(directory / "progress.json", {"rows": int(done.sum()), "bad": bad})
        missing = np.flatnonzero(done[:] == 0)
        del arrays, done
        shutil.rmtree(directory / "shards")
        self.finish(directory, missing, bad, bad_images)

    def finish(self, directory: Path, missing: np.ndarray, bad: Mapping[int, str], bad_images: str) -> None:
        """Write the manifest (the store is complete) unless bad images stop it. `missing` are the rows not
        marked done: each must be a bad image, or the store is not complete and no manifest is written."""
        unaccounted = sorted(set(missing.tolist()) - set(bad))
        if unaccounted:
            raise RuntimeError(
                f"feature store {directory}: {len(unaccounted)} rows were neither encoded nor reported unreadable "
                f"(first: {[str(self.records[i].path) for i in unaccounted[:3]]}); run again to encode them"
            )
        if bad and bad_images == "stop":
            return  # the caller raises BadImagesError; rows done so far stay on disk
        if bad:
            log.warning("skipped %d unreadable images (data.bad_images=skip):\n%s", len(bad),
                        "\n".join(f"  {self.records[i].path}: {why}" for i, why in sorted(bad.items())[:20]))
        skipped = sorted(self.records[i].image_id for i in bad)
        reasons = {str(self.records[i].image_id): why for i, why in sorted(bad.items())}
        write_json(directory / MANIFEST, {**self.manifest, "skipped": skipped, "skipped_reasons": reasons})
        for name in ("pending.json", "done.npy", "progress.json"):
            (directory / name).unlink(missing_ok=True)
        shutil.rmtree(directory / "shards", ignore_errors=True)  # left by an interrupted distributed run
