"""Bad data under data.bad_images=skip: every decoding failure and absurd shape is skipped with its reason
in the manifest (never an abort, never a giant allocation), and webdataset text errors name `shard#key`."""

from __future__ import annotations

import io
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from captioner.data import shards
from captioner.data.extraction import BadImagesError
from captioner.models.encoder import ClipEncoder
from test_features import TINY_CLIP, extract, make_images


def png(width: int, height: int, mode: str = "1") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def small_bomb_limit(monkeypatch):
    """PIL refuses images over 2 x MAX_IMAGE_PIXELS (DecompressionBombError): lower it so a 1.2 MP image is one."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500_000)


def test_skip_skips_every_decoding_failure_and_absurd_shape_with_the_reason_in_the_manifest(tmp_path, small_bomb_limit):
    records = make_images(tmp_path / "images", 12)
    records[2].path.write_bytes(png(50_000, 1))  # 50 KB of file, a gigabyte-sized resize
    records[5].path.write_bytes(png(1100, 1100))  # over the pixel limit: PIL's DecompressionBombError
    records[8].path.write_bytes(b"P6\n4 4\n")  # a truncated PPM: PIL raises ValueError
    with pytest.raises(BadImagesError, match=r"3 of 12 images") as stopped:
        extract(tmp_path / "store", records)
    assert "too elongated" in str(stopped.value) and "DecompressionBombError" in str(stopped.value)
    store = extract(tmp_path / "store", records, bad_images="skip")
    assert store.skipped == {3, 6, 9} and len(store) == 9
    reasons = json.loads((tmp_path / "store" / "manifest.json").read_text())["skipped_reasons"]
    assert set(reasons) == {"3", "6", "9"}
    assert "50000x1 is too elongated" in reasons["3"] and "DecompressionBombError" in reasons["6"] and "00009.png" in reasons["9"]


def test_an_eof_while_decoding_is_a_bad_image_not_an_abort(tmp_path, monkeypatch):
    from captioner.data import images

    records = make_images(tmp_path / "images", 4)

    def truncated(image):
        raise EOFError("no more frames")

    monkeypatch.setattr(images, "upright_rgb", truncated)
    store = extract(tmp_path / "store", records, bad_images="skip")
    assert store.skipped == {1, 2, 3, 4}


def _shard(path: Path, samples: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as tar:
        for sample in samples:
            tar.write(sample)
    return str(path)


def test_shard_text_errors_name_shard_and_key_and_references_are_strings(tmp_path, small_bomb_limit):
    image = png(24, 24, "RGB")
    url = _shard(tmp_path / "shards" / "00000.tar", [
        {"__key__": "000000001", "png": image, "json": json.dumps({"captions": ["a red square", "red"]}).encode()},
        {"__key__": "000000002", "png": image, "txt": b"\xff\xfe not utf-8"},
        {"__key__": "000000003", "png": image, "json": b"{not json"},
        {"__key__": "000000004", "png": image, "json": json.dumps({"captions": "a dog"}).encode()},
        {"__key__": "000000005", "png": image, "json": json.dumps({"captions": ["a cat", 7]}).encode()},
        {"__key__": "000000006", "png": png(50_000, 1), "txt": b"a line"},
        {"__key__": "000000007", "png": png(1100, 1100), "txt": b"a bomb"},
        {"__key__": "000000008", "ppm": b"P6\n4 4\n", "png": b"P6\n4 4\n", "txt": b"a truncated image"},
    ])
    run = partial(shards.open_or_extract, tmp_path / "store", url, partial(ClipEncoder, TINY_CLIP), TINY_CLIP, "train",
                  batch_size=4, dtype="fp32")
    with pytest.raises(BadImagesError, match="7 samples") as stopped:
        run()
    message = str(stopped.value)
    for key, why in [("2", "not UTF-8"), ("3", "not valid JSON"), ("4", "must be a list of strings, got str 'a dog'"),
                     ("5", "must hold strings"), ("6", "too elongated"), ("7", "DecompressionBombError"), ("8", "cannot be decoded")]:
        line = next(line for line in message.splitlines() if line.startswith(f"  {url}#00000000{key}: "))
        assert why in line, (key, line)
    records, store = run(bad_images="skip")
    assert [r.captions for r in records] == [("a red square", "red")]
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert len(manifest["skipped_reasons"]) == 7 and "not valid JSON" in manifest["skipped_reasons"][f"{url}#000000003"]


def test_custom_ids_do_not_collide_where_crc32_does_and_references_must_be_strings(tmp_path):
    from captioner.data.coco import load_coco, load_custom

    table = tmp_path / "captions.jsonl"  # crc32("plumless") == crc32("buckeroo"): equal suffixes keep it so
    table.write_text('{"file": "plumless.png", "caption": "a plum"}\n{"file": "buckeroo.png", "caption": "a buck"}\n')
    records = load_custom(table, tmp_path)
    assert len({r.image_id for r in records}) == 2 and all(0 <= r.image_id < 2**53 for r in records)

    table.write_text('{"file": "a.png", "caption": 7}\n')
    with pytest.raises(ValueError, match=r"rows \[1\] lack a 'file' or 'caption' value \(a non-empty string"):
        load_custom(table, tmp_path)
    for caption in ("", "   ", 5, None, ["a", "b"]):
        annotations = tmp_path / "captions.json"
        annotations.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                           "annotations": [{"image_id": 1, "caption": "fine"}, {"image_id": 1, "caption": caption}]}))
        with pytest.raises(ValueError, match=r"annotations\[1\]\.caption: a reference caption must be a non-empty string"):
            load_coco(annotations, tmp_path)
