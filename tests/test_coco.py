"""Caption dataset formats (COCO, Karpathy, custom, seeded split by image) and image decoding."""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data.coco import load_coco, load_custom, load_karpathy, load_records, random_split
from captioner.data.images import load_image

GRAYSCALE_ID = 431848  # coco_mini's one grayscale (mode "L") photo


def karpathy_file(coco_mini: Path) -> Path:
    return coco_mini / "annotations" / "dataset_coco_mini_karpathy_format.json"


def test_karpathy_and_official_formats_agree_on_coco_mini(coco_mini):
    splits = {s: load_karpathy(karpathy_file(coco_mini), coco_mini / "images", s) for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 80, "val": 79, "test": 80}
    ids = [{r.image_id for r in records} for records in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    official = {
        r.image_id: r
        for name, folder in (("captions_val2017_subset159.json", "val2017"), ("captions_train2017_subset80.json", "train2017"))
        for r in load_coco(coco_mini / "annotations" / name, coco_mini / "images" / folder)
    }
    assert len(official) == 239
    for records in splits.values():
        for r in records:  # the same image (by id) has the same file and the same five captions
            assert r.path.is_file() and r.path == official[r.image_id].path
            assert len(r.captions) == 5 and sorted(r.captions) == sorted(official[r.image_id].captions)
    both = load_karpathy(karpathy_file(coco_mini), coco_mini / "images", ["val", "test"])
    assert len(both) == 159 and {r.image_id for r in both} == ids[1] | ids[2]


def test_karpathy_restval_merges_into_train_only_when_asked(tmp_path):
    def image(cocoid: int, split: str) -> dict:
        return {"filepath": "val2014", "filename": f"{cocoid}.jpg", "cocoid": cocoid, "split": split,
                "sentences": [{"raw": f"caption {cocoid} {k} "} for k in range(2)]}

    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [image(1, "train"), image(2, "restval"), image(3, "val"), image(4, "test")]}))
    assert [r.image_id for r in load_karpathy(path, tmp_path, "train")] == [1]
    merged = load_karpathy(path, tmp_path, "train", restval=True)
    assert [r.image_id for r in merged] == [1, 2]
    assert merged[1].path == tmp_path / "val2014" / "2.jpg" and merged[1].captions == ("caption 2 0", "caption 2 1")
    assert [r.image_id for r in load_karpathy(path, tmp_path, "val", restval=True)] == [3]  # restval joins train only
    with pytest.raises(ValueError, match="unknown Karpathy split"):
        load_karpathy(path, tmp_path, "dev")


def test_custom_csv_and_jsonl_match_the_official_annotations(coco_mini, tmp_path):
    official = load_coco(coco_mini / "annotations" / "captions_val2017_subset159.json", coco_mini / "images" / "val2017")
    rows = [(r.path.name, c) for r in official for c in r.captions]
    with (tmp_path / "captions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        writer.writerows(rows[::-1])  # any row order
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps({"file": f, "caption": c}) for f, c in rows) + "\n")
    from_csv = load_custom(tmp_path / "captions.csv", coco_mini / "images" / "val2017")
    from_jsonl = load_custom(tmp_path / "captions.jsonl", coco_mini / "images" / "val2017")
    assert len(from_csv) == len(official) == 159
    by_path = {r.path: r for r in official}
    for r in from_csv:
        assert sorted(r.captions) == sorted(by_path[r.path].captions)
    assert {r.path: (r.image_id, sorted(r.captions)) for r in from_csv} == {r.path: (r.image_id, sorted(r.captions)) for r in from_jsonl}
    (tmp_path / "short.csv").write_text("file,caption\n" + "".join(f"{f},{c}\n" for f, c in rows[:12]))
    subset = {r.path: r.image_id for r in load_custom(tmp_path / "short.csv", coco_mini / "images" / "val2017")}
    assert all(subset[p] == r.image_id for r in from_csv for p in [r.path] if p in subset)  # ids stable as rows change
    (tmp_path / "bad.csv").write_text("file,caption\na.jpg,\n")
    with pytest.raises(ValueError, match="lack a 'file' or 'caption'"):
        load_custom(tmp_path / "bad.csv", tmp_path)


def test_random_split_is_by_image_seeded_and_80_10_10(coco_mini):
    spec = {"format": "karpathy", "file": karpathy_file(coco_mini), "images": coco_mini / "images", "split": ["train", "val", "test"]}
    everything = load_records(spec)
    parts = {p: load_records({**spec, "random_split": {"part": p, "seed": 3}}) for p in ("train", "val", "test")}
    ids = {p: {r.image_id for r in records} for p, records in parts.items()}
    assert {p: len(v) for p, v in ids.items()} == {"train": 191, "val": 24, "test": 24}
    assert ids["train"] | ids["val"] | ids["test"] == {r.image_id for r in everything}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert all(len(r.captions) == 5 for records in parts.values() for r in records)  # an image keeps all its captions
    again = random_split(everything[::-1], "test", seed=3)  # order of the source does not matter
    assert [r.image_id for r in again] == [r.image_id for r in parts["test"]]
    assert {r.image_id for r in random_split(everything, "test", seed=4)} != ids["test"]
    with pytest.raises(ValueError, match="three fractions summing to 1"):
        random_split(everything, "test", fractions=(0.5, 0.5, 0.5))


def test_load_records_picks_the_format_and_refuses_unknown_ones(coco_mini):
    val = {"annotations": coco_mini / "annotations" / "captions_val2017_subset159.json", "images": coco_mini / "images" / "val2017"}
    train = {"annotations": coco_mini / "annotations" / "captions_train2017_subset80.json", "images": coco_mini / "images" / "train2017"}
    assert len(load_records(val)) == 159  # no format: the official COCO JSON
    pooled = load_records({"format": "coco", "annotations": [val["annotations"], train["annotations"]], "images": [val["images"], train["images"]]})
    assert len(pooled) == 239 and all(r.path.is_file() for r in pooled)
    with pytest.raises(ValueError, match="unknown data format 'tsv'"):
        load_records({"format": "tsv"})


def _png16_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write one)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_every_image_mode_becomes_correct_rgb(tmp_path):
    Image.new("L", (8, 6), 77).save(tmp_path / "gray.png")
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    palette = Image.new("P", (8, 6), 0)
    palette.putpalette([0, 0, 255, 10, 200, 10] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "palette.png")
    transparent = palette.copy()
    transparent.info["transparency"] = 1
    transparent.save(tmp_path / "palette_alpha.png")
    Image.new("RGBA", (8, 6), (200, 0, 0, 0)).save(tmp_path / "rgba.png")  # fully transparent: white
    Image.new("LA", (8, 6), (30, 255)).save(tmp_path / "la.png")  # opaque gray
    gray16 = (np.arange(48).reshape(6, 8) * 1300).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    rgb16 = np.zeros((6, 8, 3), np.uint16)
    rgb16[...] = (0xFF00, 0x8000, 0x1234)
    _png16_rgb(tmp_path / "rgb16.png", rgb16)
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 255, 0), (0, 0, 10, 20))  # green on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated.save(tmp_path / "exif.jpg", exif=exif, quality=95)

    def rgb(name: str) -> np.ndarray:
        image = load_image(tmp_path / name)
        assert image.mode == "RGB"
        return np.asarray(image).astype(int)

    assert (rgb("gray.png") == 77).all()
    assert np.abs(rgb("cmyk.jpg") - (255, 0, 0)).max() <= 2
    assert tuple(rgb("palette.png")[0, 0]) == (0, 0, 255) and tuple(rgb("palette.png")[1, 1]) == (10, 200, 10)
    assert tuple(rgb("palette_alpha.png")[1, 1]) == (255, 255, 255) and tuple(rgb("palette_alpha.png")[0, 0]) == (0, 0, 255)
    assert (rgb("rgba.png") == 255).all()
    assert (rgb("la.png") == 30).all()
    assert (rgb("gray16.png")[..., 0] == gray16 >> 8).all() and (rgb("gray16.png")[..., 2] == gray16 >> 8).all()
    assert tuple(rgb("rgb16.png")[3, 3]) == (0xFF, 0x80, 0x12)
    upright = rgb("exif.jpg")
    assert upright.shape == (40, 20, 3)  # portrait after applying the orientation
    assert upright[5, 10, 1] > 200 and upright[35, 10, 0] > 200  # stored left (green) is now the top


def test_unreadable_images_raise_naming_the_file(tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (64, 64), 9).save(tmp_path / "whole.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:200])
    for name in ("missing.jpg", "corrupt.jpg", "truncated.jpg"):
        with pytest.raises(ValueError, match=name):
            load_image(tmp_path / name)


def test_coco_minis_grayscale_photo_loads_as_rgb(coco_mini):
    path = coco_mini / "images" / "val2017" / f"{GRAYSCALE_ID:012d}.jpg"
    assert Image.open(path).mode == "L"
    pixels = np.asarray(load_image(path))
    assert pixels.shape[2] == 3 and (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
