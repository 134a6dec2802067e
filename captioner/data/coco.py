"""Caption datasets as `ImageRecord`s: one per image, with every reference caption.

Formats (`load_records` picks one from a split's config):
    coco       the official caption JSON: `images[]` + `annotations[]`
    karpathy   Karpathy's `dataset_coco.json`: `images[].{filepath, filename, cocoid, split, sentences[]}`
    custom     an image folder + a CSV or JSONL table of `file, caption` (one row per caption)
and, on top of any of them, `random_split`: a seeded split *by image* (the paper's 80/10/10), so the
captions of one image never land in two splits.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path



@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    captions: tuple[str, ...]
    mirrored: bool = False  # the image flipped left to right (a training twin, data/mirror.py)


def load_coco(annotation_file: str | Path, image_dir: str | Path) -> list[ImageRecord]:
    """Official COCO caption JSON (`images[]`, `annotations[]`), records sorted by image id."""
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    if not annotation_file.is_file():
        raise FileNotFoundError(f"COCO annotation file {annotation_file} does not exist: point data.splits.{{train,val,test}}.annotations "
                                f"at your files, or paths.coco_root (COCO_ROOT=...) at an MS COCO folder")
    coco = json.loads(annotation_file.read_text())
    if "images" not in coco or "annotations" not in coco:
        raise ValueError(f"{annotation_file} is not in the COCO caption format: it needs 'images' and 'annotations'")
    captions: dict[int, list[str]] = {}
    for n, a in enumerate(coco["annotations"]):
        captions.setdefault(int(a["image_id"]), []).append(reference(a.get("caption"), f"{annotation_file}: annotations[{n}].caption"))
    records = [
        ImageRecord(int(im["id"]), image_dir / im["file_name"], tuple(captions.get(int(im["id"]), ())))
        for im in coco["images"]
    ]
    empty = [r.image_id for r in records if not r.captions]
    if empty:
        raise ValueError(f"{len(empty)} images in {annotation_file} have no caption, e.g. {empty[:5]}")
    return sorted(records, key=lambda r: r.image_id)


KARPATHY_SPLITS = ("train", "restval", "val", "test")


def load_karpathy(split_file: str | Path, image_root: str | Path, splits: str | Sequence[str], restval: bool = False) -> list[ImageRecord]:
    """Karpathy's `dataset_coco.json`: the images whose `split` is in `splits`, ids = COCO ids.

    `restval=True` adds the `restval` images (the 30,504 val2014 images outside Karpathy's val/test)
    to a request for `train`: the usual 113,287-image training set. Paths are `image_root/filepath/filename`.
    """
    split_file, image_root = Path(split_file), Path(image_root)
    wanted = {splits} if isinstance(splits, str) else set(splits)
    unknown = wanted - set(KARPATHY_SPLITS)
    if unknown:
        raise ValueError(f"unknown Karpathy split(s) {sorted(unknown)}: choose from {KARPATHY_SPLITS}")
    if restval and "train" in wanted:
        wanted.add("restval")
    if not split_file.is_file():
        raise FileNotFoundError(f"Karpathy split file {split_file} does not exist (README: Training on COCO)")
    data = json.loads(split_file.read_text())
    if "images" not in data or (data["images"] and "sentences" not in data["images"][0]):
        raise ValueError(f"{split_file} is not Karpathy's dataset_coco.json: it needs images[].sentences")
    records = [
        ImageRecord(
            int(im.get("cocoid", im.get("imgid"))),
            image_root / im.get("filepath", "") / im["filename"],
            tuple(reference(s.get("raw"), f"{split_file}: image {im.get('filename')} sentence {k}") for k, s in enumerate(im["sentences"])),
        )
        for im in data["images"]
        if im["split"] in wanted
    ]
    return _checked(records, split_file)


def reference(value, where: str) -> str:
    """A reference caption: a string with text in it, stripped; anything else is refused naming where it is."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: a reference caption must be a non-empty string, got {value!r:.60}")
    return value.strip()


def file_id(name: str) -> int:
    """A file's stable image id: 53 bits of its name's BLAKE2b hash, exact in every JSON reader (JavaScript's
    too). A 32-bit CRC gives two files of a 77,000-image folder the same id one time in two; 53 bits, one
    time in 30,000 at a million files, and a collision is still refused below."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") >> 11


def load_custom(table: str | Path, image_dir: str | Path) -> list[ImageRecord]:
    """An image folder + a CSV (header `file,caption`) or JSONL (`{"file": ..., "caption": ...}`) table.

    One row per caption; rows of the same file are one image. Image ids are a stable hash of the
    file name (an optional `image_id` column overrides them), so adding rows never renumbers images.
    """
    table, image_dir = Path(table), Path(image_dir)
    if not table.is_file():
        raise FileNotFoundError(f"caption table {table} does not exist (data.splits.<split>.file)")
    if table.suffix.lower() in (".jsonl", ".json"):
        lines = table.read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    elif table.suffix.lower() in (".csv", ".tsv"):
        with table.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if table.suffix.lower() == ".tsv" else ","))
    else:
        raise ValueError(f"caption table {table} must be .csv, .tsv or .jsonl")
    missing = [n for n, row in enumerate(rows, 1) if not isinstance(row, dict) or not row.get("file")
               or not isinstance(row.get("caption"), str) or not row["caption"].strip()]
    if missing:
        raise ValueError(f"{table}: rows {missing[:5]} lack a 'file' or 'caption' value (a non-empty string; columns: file, caption)")
    captions: dict[str, list[str]] = {}
    ids: dict[str, int] = {}
    for row in rows:
        captions.setdefault(row["file"], []).append(row["caption"].strip())
        ids.setdefault(row["file"], int(row["image_id"]) if row.get("image_id") not in (None, "") else file_id(row["file"]))
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"{table}: two files share an image id; give each file a distinct image_id column value")
    records = [ImageRecord(ids[f], image_dir / f, tuple(c)) for f, c in captions.items()]
    return _checked(records, table)


def random_split(records: Sequence[ImageRecord], part: str, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> list[ImageRecord]:
    """One part (`train`, `val` or `test`) of a seeded split by image with these fractions."""
    parts = ("train", "val", "test")
    if part not in parts or len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"random_split needs part in {parts} and three fractions summing to 1, got {part!r}, {list(fractions)}")
    order = sorted(records, key=lambda r: r.image_id)  # independent of the file's order
    random.Random(seed).shuffle(order)
    train_end = round(fractions[0] * len(order))
    val_end = train_end + round(fractions[1] * len(order))
    bounds = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, len(order))}[part]
    return sorted(order[bounds[0] : bounds[1]], key=lambda r: r.image_id)


def load_records(spec: Mapping) -> list[ImageRecord]:
    """The records of one split from its config; `format` defaults to `coco`.

        {format: coco, annotations: captions.json | [files], images: dir | [dirs]}
        {format: karpathy, file: dataset_coco.json, images: root, split: train|[...], restval: true}
        {format: custom, file: captions.csv|.jsonl, images: dir}
    plus `random_split: {part: train|val|test, fractions: [0.8, 0.1, 0.1], seed: 0}` with any of them.
    """
    spec = dict(spec)
    fmt = spec.get("format", "coco")
    if fmt == "coco":  # lists pool several files, e.g. train2014 + val2014 before a random split
        files, dirs = spec["annotations"], spec["images"]
        files, dirs = ([files], [dirs]) if isinstance(files, (str, Path)) else (files, dirs)
        if len(files) != len(dirs):
            raise ValueError(f"data.splits: {len(files)} annotation files but {len(dirs)} image folders; pair them")
        records = _checked([r for f, d in zip(files, dirs) for r in load_coco(f, d)], Path(files[0]))
    elif fmt == "karpathy":
        records = load_karpathy(spec["file"], spec["images"], spec["split"], spec.get("restval", False))
    elif fmt == "custom":
        records = load_custom(spec["file"], spec["images"])
    else:
        raise ValueError(f"unknown data format {fmt!r}: use coco, karpathy or custom (data.splits.<split>.format)")
    if spec.get("random_split"):
        records = random_split(records, **spec["random_split"])
    return records


def _checked(records: list[ImageRecord], source: Path) -> list[ImageRecord]:
    empty = [r.image_id for r in records if not r.captions]
    if empty:
        raise ValueError(f"{len(empty)} images in {source} have no caption, e.g. {empty[:5]}")
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source} lists an image id twice; ids must be unique per image")
    return sorted(records, key=lambda r: r.image_id)
