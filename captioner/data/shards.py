"""Web-scale image-caption pairs: img2dataset-style webdataset tar shards into the feature store.

A shard is a tar of samples `{key}.jpg` (or .jpeg/.png/.webp) + `{key}.txt` (the caption) and/or
`{key}.json` (`caption`, or `captions: [...]` for several references), as img2dataset writes them for
CC3M, CC12M or LAION subsets. `data.splits.<split>.shards` is a brace-expanded pattern
(`/data/cc3m/{00000..00331}.tar`) or a list of them; each URL is a local path or anything fsspec
opens (`s3://`, `gs://`, `https://`, ...). Tars are read by the `webdataset` library, streamed once.

Extraction writes the store layout of features.py (manifest last; training reads it as any store),
plus `captions.json` (row i's references), and while it runs:
    parts/settings.json      the store's settings: a part made with others is refused
    parts/NNNNNN/            shard N done: its arrays in batches, keys, captions (renamed in when complete)
    parts/NNNNNN.tmp/        shard N in flight; a kill loses at most this shard, which is read again
Shard N belongs to global rank N % world_size, so ranks and nodes split the shards without talking;
rank 0 merges the parts in shard order. Batches are cut within a shard, so the store does not depend
on how many processes wrote it or how often they were killed, and each image is encoded exactly as
COCO-format extraction encodes it (same decoder, same preprocessing).

A sample's image id is its key when the key is a number (img2dataset's keys are), else a 63-bit hash
of it; the manifest keeps the keys, the shard list and each shard's count.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import braceexpand
import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.data.coco import ImageRecord
from captioner.data.images import decode
from captioner.data.extraction import BAD_IMAGE_POLICIES, BadImagesError
from captioner.data.features import FeatureStore, describe
from captioner.data.disk import new_arrays
from captioner.data.manifest import StaleStoreError, check_manifest, differences, read_manifest, refuse_complete, sole_writer

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SETTINGS = ("version", "encoder", "precision", "preprocessing", "normalisation", "dtype", "split", "patch_tokens", "shards")


def expand(shards: str | Sequence[str]) -> list[str]:
    """`a/{000..003}.tar` or a list of such patterns -> the shard URLs, in order."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls = [url for pattern in patterns for url in braceexpand.braceexpand(str(pattern))]
    if not urls:
        raise ValueError("data.splits.<split>.shards lists no shard: give a pattern such as /data/cc3m/{00000..00331}.tar")
    if len(set(urls)) != len(urls):
        raise ValueError("data.splits.<split>.shards names a shard twice: each shard may appear once")
    return urls


def image_id(key: str) -> int:
    """img2dataset's numeric keys are the ids; any other key gets a stable 63-bit hash."""
    if key.isdigit() and int(key) < 2**63:
        return int(key)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def _open(url: str):
    """A local path through open(), anything else through fsspec."""
    if "://" not in url or url.startswith("file://"):
        path = url.removeprefix("file://")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {url} does not exist (data.splits.<split>.shards)")
        return open(path, "rb")
    return fsspec.open(url, "rb").open()


class CaptionTextError(ValueError):
    """A sample's caption text that is not UTF-8, not JSON, or not a string (list of strings) where one belongs."""


def _strings(value, field: str) -> list[str]:
    """`caption` (a string) or `captions` (a list of strings) as stripped, non-empty strings."""
    if field == "caption":
        value = [value]
    elif not isinstance(value, list):  # a bare string would be read as its characters
        raise CaptionTextError(f".json `captions` must be a list of strings, got {type(value).__name__} {value!r:.60}")
    if not all(isinstance(c, str) for c in value):
        raise CaptionTextError(f".json `{field}` must hold strings, got {[type(c).__name__ for c in value]}")
    return [c.strip() for c in value if c.strip()]


def _captions(sample: dict) -> tuple[str, ...]:
    """The sample's references; raises CaptionTextError naming what is wrong with its text."""
    try:
        if "json" in sample:
            meta = json.loads(sample["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise CaptionTextError(f".json must be an object with caption/captions, got {type(meta).__name__}")
            for field in ("captions", "caption"):
                found = _strings(meta[field], field) if meta.get(field) not in (None, "", []) else []
                if found:
                    return tuple(found)
        if "txt" in sample:
            return tuple(line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line.strip())
    except UnicodeDecodeError as e:
        raise CaptionTextError(f"caption text is not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise CaptionTextError(f".json is not valid JSON ({e})") from None
    return ()


def _decode(sample: dict, preprocess) -> tuple[torch.Tensor | None, tuple[str, ...], str | None]:
    """(pixels, captions, why the sample is unusable or None): the same decoder as coco.load_image,
    and every failure of the sample's text or image is a reason, never an exception."""
    try:
        captions = _captions(sample)
    except CaptionTextError as e:
        return None, (), str(e)
    ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if ext is None:
        return None, captions, f"no image ({'/'.join(IMAGE_EXTENSIONS)}) in the sample"
    if not captions:
        return None, captions, "no caption (.txt, or .json with caption/captions)"
    try:
        return preprocess(decode(io.BytesIO(sample[ext]), f"{sample['__key__']}.{ext}")), captions, None
    except ValueError as e:
        return None, captions, str(e)


class _ShardBatches(torch.utils.data.IterableDataset):
    """Each DataLoader worker streams whole shards: yields batches cut within a shard, the last one
    of each shard marked `last` (an empty shard yields just that marker)."""

    def __init__(self, shards: Sequence[tuple[int, str]], preprocess, batch_size: int):
        self.shards, self.preprocess, self.batch_size = list(shards), preprocess, batch_size

    def __iter__(self) -> Iterator[dict]:
        for index, url in wds.split_by_worker(self.shards):
            with _open(url) as stream:
                files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
                samples = wds.tariterators.group_by_keys(files)
                batch = self._empty(index, url, 0)
                for sample in samples:
                    pixels, captions, error = _decode(sample, self.preprocess)
                    if error:
                        batch["bad"][sample["__key__"]] = error
                    else:
                        batch["keys"].append(sample["__key__"])
                        batch["captions"].append(captions)
                        batch["pixels"].append(pixels)
                    if len(batch["keys"]) == self.batch_size:
                        yield self._stacked(batch)
                        batch = self._empty(index, url, batch["number"] + 1)
                yield self._stacked({**batch, "last": True})

    @staticmethod
    def _empty(index: int, url: str, number: int) -> dict:
        return {"index": index, "url": url, "number": number, "keys": [], "captions": [], "pixels": [], "bad": {}, "last": False}

    @staticmethod
    def _stacked(batch: dict) -> dict:
        return {**batch, "pixels": torch.stack(batch["pixels"]) if batch["pixels"] else None}


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


class ShardExtraction:
    """Encodes this rank's shards into parts/, then (rank 0) merges them into the store."""

    def __init__(self, directory: Path, urls: list[str], encoder, settings: dict, shapes: dict, batch_size: int,
                 num_workers: int, device, rank: int, world_size: int):
        self.directory, self.parts, self.urls, self.encoder = directory, directory / "parts", urls, encoder
        self.settings, self.shapes, self.batch_size, self.num_workers = settings, shapes, batch_size, num_workers
        self.device, self.rank, self.world_size = device, rank, world_size
        self.np_dtype = np.float16 if settings["dtype"] == "fp16" else np.float32

    def prepare(self) -> None:
        """Rank 0, before the others start: check or write the settings; drop shards left in flight."""
        self.parts.mkdir(parents=True, exist_ok=True)
        found = self.parts / "settings.json"
        if found.exists():
            diff = differences(json.loads(found.read_text()), self.settings)
            if diff:
                raise StaleStoreError(
                    f"partly extracted store {self.directory} was started with other settings: {'; '.join(diff)}. "
                    f"Delete the directory to start over, or point data.cache_dir elsewhere."
                )
        else:
            _write_json(found, self.settings)
        for tmp in self.parts.glob("*.tmp"):
            shutil.rmtree(tmp)

    def part(self, index: int) -> Path:
        return self.parts / f"{index:06d}"

    def encode(self, policy: str) -> None:
        """Encode every shard of this rank that has no part yet."""
        mine = [(i, url) for i, url in enumerate(self.urls) if i % self.world_size == self.rank and not self.part(i).is_dir()]
        loader = DataLoader(_ShardBatches(mine, self.encoder.preprocess, self.batch_size), batch_size=None,
                            num_workers=min(self.num_workers, len(mine)))
        desc = f"extract {self.settings['split']} shards" + (f" [rank {self.rank}]" if self.world_size > 1 else "")
        with tqdm(total=len(mine), desc=desc, unit="shard", position=self.rank) as bar:
            images = 0
            for batch in loader:
                tmp = self.part(batch["index"]).with_suffix(".tmp")
                if batch["number"] == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                if batch["pixels"] is not None:
                    out = self.encoder(batch["pixels"].to(self.device))
                    for name in self.shapes:
                        np.save(tmp / f"{name}-{batch['number']:06d}.npy", out[name].cpu().numpy().astype(self.np_dtype))
                    images += len(batch["keys"])
                    bar.set_postfix(images=images)
                _write_json(tmp / f"samples-{batch['number']:06d}.json", {k: batch[k] for k in ("keys", "captions", "bad")})
                if batch["last"]:
                    self.commit(tmp, batch, policy)
                    bar.update(1)

    def commit(self, tmp: Path, last: dict, policy: str) -> None:
        """A finished shard becomes a part, unless bad samples stop it (then it is read again next time)."""
        samples = [json.loads(p.read_text()) for p in sorted(tmp.glob("samples-*.json"))]
        bad = {k: why for s in samples for k, why in s["bad"].items()}
        summary = {"url": last["url"], "batches": len(samples), "count": sum(len(s["keys"]) for s in samples), "bad": bad}
        if bad and policy == "stop":
            _write_json(self.parts / f"{last['index']:06d}.bad.json", summary)
            shutil.rmtree(tmp)
            return
        (self.parts / f"{last['index']:06d}.bad.json").unlink(missing_ok=True)
        _write_json(tmp / "part.json", summary)
        os.replace(tmp, self.part(last["index"]))

    def bad(self) -> dict[str, str]:
        return {f"{s['url']}#{k}": why for p in sorted(self.parts.glob("*.bad.json")) for s in [json.loads(p.read_text())]
                for k, why in s["bad"].items()}

    def merge(self) -> None:
        """Rank 0, once every shard has a part: the parts in shard order become the store. A store already
        complete is left exactly as it is."""
        if read_manifest(self.directory) is not None:
            log.warning("feature store %s is already complete: its parts are dropped, the store is kept", self.directory)
            shutil.rmtree(self.parts, ignore_errors=True)
            return
        parts = [self.part(i) for i in range(len(self.urls))]
        absent = [self.urls[i] for i, p in enumerate(parts) if not (p / "part.json").is_file()]
        if absent:
            raise RuntimeError(f"feature store {self.directory}: {len(absent)} shards have no finished part "
                               f"(first: {absent[:3]}); run again to read them")
        summaries = [json.loads((p / "part.json").read_text()) for p in parts]
        keys, captions, owner, batches = [], [], {}, []  # batches: (part, number, rows)
        for index, (part, summary) in enumerate(zip(parts, summaries)):
            for b in range(summary["batches"]):
                samples = json.loads((part / f"samples-{b:06d}.json").read_text())
                for key in samples["keys"]:
                    if image_id(key) in owner:
                        raise ValueError(f"sample key {key!r} is in shard {self.urls[owner[image_id(key)]]} and in "
                                         f"shard {self.urls[index]}: keys must be unique within a split")
                    owner[image_id(key)] = index
                keys += samples["keys"]
                captions += samples["captions"]
                batches.append((part, b, len(samples["keys"])))
        refuse_complete(self.directory)
        arrays = new_arrays(self.directory, {name: (self.np_dtype, (len(keys), *shape)) for name, shape in self.shapes.items()},
                            f"feature store {self.directory}")
        row = 0
        for part, b, rows in batches:
            if rows:  # a batch of only unusable samples wrote no arrays
                for name, array in arrays.items():
                    array[row : row + rows] = np.load(part / f"{name}-{b:06d}.npy")
            row += rows
        if row != len(keys):  # every good sample has its row, or the store is not declared complete
            raise RuntimeError(f"feature store {self.directory}: merged {row} rows for {len(keys)} samples; run again")
        for array in arrays.values():
            array.flush()
        del arrays
        skipped = {f"{s['url']}#{k}": why for s in summaries for k, why in s["bad"].items()}
        if skipped:
            log.warning("skipped %d unusable samples (data.bad_images=skip):\n%s", len(skipped),
                        "\n".join(f"  {k}: {why}" for k, why in sorted(skipped.items())[:20]))
        _write_json(self.directory / "captions.json", captions)
        ids = [image_id(k) for k in keys]
        manifest = {**self.settings, "source": "webdataset", "count": len(keys), "image_ids": ids, "keys": keys,
                    "shard_counts": [s["count"] for s in summaries], "skipped": [], "skipped_samples": sorted(skipped),
                    "skipped_reasons": dict(sorted(skipped.items())),
                    "content_hash": hashlib.sha256("\n".join(f"{u}\t{s['count']}" for u, s in zip(self.urls, summaries)).encode()
                                                   + "\n".join(keys).encode()).hexdigest()}
        _write_json(self.directory / "manifest.json", manifest)  # last: the store is complete
        shutil.rmtree(self.parts)


def records_of(store: FeatureStore) -> list[ImageRecord]:
    """The store's rows as records: id, `shard#key` as the path (the image lives inside a tar), captions."""
    captions = json.loads((store.directory / "captions.json").read_text())
    shard_of = np.repeat(np.arange(len(store.manifest["shards"])), store.manifest["shard_counts"])
    return [ImageRecord(i, Path(f"{store.manifest['shards'][s]}#{k}"), tuple(c))
            for i, k, s, c in zip(store.image_ids, store.manifest["keys"], shard_of, captions)]


def open_or_extract(
    directory: str | Path,
    shards: str | Sequence[str],
    encoder_factory: Callable,
    encoder_spec,
    split: str,
    precision: str = "fp32",
    dtype: str = "fp16",
    tokens: bool = True,
    batch_size: int = 64,
    num_workers: int = 0,
    bad_images: str = "stop",
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
) -> tuple[list[ImageRecord], FeatureStore]:
    """The split's records and store, extracting the shards first when the store is not complete.
    Every process of a distributed run calls this with its rank and a barrier (the directory must be
    on a file system all nodes share)."""
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r} (data.bad_images)")
    directory, urls, barrier = Path(directory), expand(shards), barrier or (lambda: None)
    with sole_writer(directory, rank, world_size, barrier):
        if read_manifest(directory) is not None:
            wanted = {k: v for k, v in _settings([], encoder_spec, precision, 0, split, dtype, tokens, urls).items() if k != "preprocessing"}
            check_manifest(directory, wanted, "feature store", "Delete the directory to re-extract, or point data.cache_dir elsewhere.")
            store = FeatureStore(directory)
            return records_of(store), store
        encoder = encoder_factory().to(device)
        shapes = {"clip_features": (encoder.embed_dim,)}
        if tokens:
            shapes["patch_tokens"] = (encoder.num_tokens, encoder.token_dim)
        settings = _settings([], encoder_spec, precision, encoder.resolution, split, dtype, tokens, urls)
        job = ShardExtraction(directory, urls, encoder, settings, shapes, batch_size, num_workers, device, rank, world_size)
        if rank == 0:
            job.prepare()
        barrier()
        job.encode(bad_images)
        barrier()
        bad = job.bad()
        if rank == 0 and not bad:
            job.merge()
        barrier()
        if bad:
            listed = "\n".join(f"  {k}: {why}" for k, why in sorted(bad.items())[:50])
            raise BadImagesError(
                f"{len(bad)} samples of the shards cannot be used:\n{listed}\nThe other shards' features are kept in "
                f"{directory / 'parts'}. Fix or drop these samples and run again (only their shards are read again), "
                f"or set data.bad_images=skip to leave them out."
            )
        store = FeatureStore(directory)
        return records_of(store), store


def _settings(records, encoder_spec, precision, resolution, split, dtype, tokens, urls) -> dict:
    base = describe(records, encoder_spec, precision, resolution, split, dtype, tokens)
    return {**{k: base[k] for k in SETTINGS if k in base}, "shards": urls}
