"""python -m captioner.caption over files, globs and folders; JSONL/CSV out; corrupt files skipped."""

from __future__ import annotations

import csv
import json

import pytest

from captioner.api import Captioner
from captioner.caption import expand, main
from conftest import scenes


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of images in several formats, a nested folder, a corrupt file and a non-image."""
    root = tmp_path_factory.mktemp("photos")
    (root / "nested").mkdir()
    names = ["a.png", "b.jpg", "nested/c.webp"]
    for name, image in zip(names, scenes("large red circle", "row of three", "large blue square left")):
        image.save(root / name, quality=95)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folders_and_globs_expand_to_image_files(photos):
    files, unmatched = expand([str(photos), str(photos / "*.png"), str(photos / "nothing-*.jpg")])
    assert sorted(p.name for p in files) == ["a.png", "b.jpg", "broken.jpg", "c.webp"]  # no repeats, no .txt
    assert unmatched == [str(photos / "nothing-*.jpg")]
    assert [p.name for p in expand([str(photos / "**" / "*.webp")])[0]] == ["c.webp"]


def test_jsonl_rows_match_the_api_and_corrupt_files_are_skipped(photos, distinct_ckpt, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    assert main([str(photos), "--ckpt", str(distinct_ckpt), "-o", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["file"].rsplit("/", 1)[-1] for r in rows) == ["a.png", "b.jpg", "c.webp"]
    expected = Captioner.from_pretrained(distinct_ckpt).caption([r["file"] for r in rows])
    assert len(set(expected)) == 3, expected  # each image its own caption: one caption for all would pass below
    assert [r["caption"] for r in rows] == expected
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.jpg" in err and "cannot be decoded" in err
    assert "captioned 3 image(s)" in err and "skipped 1" in err


def test_csv_output_and_beam_search(photos, distinct_ckpt, tmp_path):
    out = tmp_path / "captions.csv"
    assert main([str(photos / "a.png"), str(photos / "b.jpg"), "--ckpt", str(distinct_ckpt), "-o", str(out), "--strategy", "beam"]) == 0
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "caption"] and len(rows) == 3
    expected = Captioner.from_pretrained(distinct_ckpt).caption([photos / "a.png", photos / "b.jpg"], strategy="beam")
    assert [r[1] for r in rows[1:]] == expected and expected[0] != expected[1], expected


def test_prints_captions_when_no_output_file_is_given(photos, distinct_ckpt, capsys):
    assert main([str(photos / "*.png"), "--ckpt", str(distinct_ckpt)]) == 0
    [line] = capsys.readouterr().out.strip().splitlines()
    file, caption = line.split("\t")
    assert file.endswith("a.png") and caption


def test_nothing_to_caption_is_an_error(tmp_path, distinct_ckpt, capsys):
    assert main([str(tmp_path / "*.jpg"), "--ckpt", str(distinct_ckpt)]) == 2
    assert "matched no image file" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("nope")
    assert main([str(tmp_path / "bad.png"), "--ckpt", str(distinct_ckpt)]) == 1
