"""The held-out world of bench/heldout_world.py: every reference caption it writes is right by its own parser,
swapped places and a wrong shape are wrong, and captions of another data set are refused in one line."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import heldout_world  # noqa: E402

PAIR = [{"shape": "ring", "colour": "cyan", "place": "top left"}, {"shape": "cross", "colour": "pink", "place": "centre"}]


def test_every_reference_is_right_and_the_test_split_scores_its_own_captions(tmp_path):
    heldout_world.write(tmp_path, {"train": 30, "val": 5, "test": 20}, seed=1)
    data = json.loads((tmp_path / "annotations" / "captions_test.json").read_text())
    truth = {im["id"]: im["truth"] for im in data["images"]}
    assert {len(t) for t in truth.values()} == {1, 2} and all("scene" not in im for im in data["images"])
    assert all(heldout_world.right(a["caption"], truth[a["image_id"]]) for a in data["annotations"])
    first = {}
    for a in data["annotations"]:
        first.setdefault(a["image_id"], a["caption"])
    (tmp_path / "captions.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in first.items()]))
    assert heldout_world.score(tmp_path, tmp_path / "captions.json")["accuracy"] == 1.0


def test_places_bind_to_their_own_objects():
    assert heldout_world.right("a cyan ring in the top left and a pink cross in the centre", PAIR)
    assert heldout_world.right("in the middle a pink plus sign, a cyan hoop at the upper left", PAIR)
    assert not heldout_world.right("a cyan ring in the centre and a pink cross in the top left", PAIR)  # swapped
    assert not heldout_world.right("a cyan star in the top left and a pink cross in the centre", PAIR)  # a wrong shape
    assert not heldout_world.right("a cyan ring in the top left", PAIR)  # one object missing
    assert not heldout_world.right("a cyan ring and a pink cross in the top left and the centre", PAIR)  # places not bound


def test_captions_of_other_images_are_one_line(tmp_path):
    heldout_world.write(tmp_path, {"train": 2, "val": 1, "test": 2}, seed=1)
    (tmp_path / "captions.json").write_text(json.dumps([{"image_id": 999, "caption": "a red circle"}]))
    with pytest.raises(SystemExit, match="error: .* holds captions of images this world's test split"):
        heldout_world.score(tmp_path, tmp_path / "captions.json")


def test_the_score_counts_pairs_of_one_colour_on_their_own_row(tmp_path):
    one_colour = [{**PAIR[0], "colour": "pink"}, PAIR[1]]  # a pink ring in the top left, a pink cross in the centre
    images = [{"id": 1, "truth": PAIR}, {"id": 2, "truth": one_colour}, {"id": 3, "truth": PAIR[:1]}]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_test.json").write_text(json.dumps({"images": images, "annotations": []}))
    captions = {1: "a cyan ring in the top left and a pink cross in the centre",
                2: "a pink ring in the centre and a pink cross in the top left",  # the two objects the other way round
                3: "a cyan ring in the top left"}
    (tmp_path / "captions.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in captions.items()]))
    scores = heldout_world.score(tmp_path, tmp_path / "captions.json")
    assert scores["two of one colour"] == 0.0 and scores["two objects"] == 0.5 and scores["one object"] == 1.0
    assert scores["accuracy"] == pytest.approx(2 / 3)  # each image counted once


def test_the_probe_reads_each_object_from_the_patches_of_its_own_place():
    # 96 px at patch 16: a 6 x 6 grid, 2 x 2 patches a place, row-major
    assert heldout_world.place_cells("top left", 6) == [0, 1, 6, 7]
    assert heldout_world.place_cells("centre", 6) == [14, 15, 20, 21]
    assert heldout_world.place_cells("bottom right", 6) == [28, 29, 34, 35]
    assert heldout_world.place_cells("right", 3) == [5]
    with pytest.raises(ValueError, match="3 x 3 places"):
        heldout_world.place_cells("top", 4)


def test_binding_reads_each_objects_own_place_against_the_others():
    one_colour = [{**PAIR[0], "colour": "pink"}, PAIR[1]]
    assert heldout_world.binding_texts(PAIR) == [
        ("two colours", "a cyan ring in the top left", "a cyan ring in the centre"),
        ("two colours", "a pink cross in the centre", "a pink cross in the top left"),
    ]
    assert [k for k, _, _ in heldout_world.binding_texts(one_colour)] == ["two of one colour"] * 2
    assert heldout_world.binding_texts([PAIR[0], {**PAIR[0], "place": "centre"}]) == []  # the same object twice


def test_binding_scores_a_checkpoint_on_the_worlds_pairs(tmp_path, embedded_ckpt):
    heldout_world.write(tmp_path, {"test": 12}, seed=3)
    images = json.loads((tmp_path / "annotations" / "captions_test.json").read_text())["images"]
    expected = {}
    for im in images:
        if len(im["truth"]) == 2:
            for kind, _, _ in heldout_world.binding_texts(im["truth"]):
                expected[kind] = expected.get(kind, 0) + 1
    shares = heldout_world.binding(tmp_path, embedded_ckpt)
    assert set(shares) == set(expected) and all(0 <= v <= 1 for v in shares.values())
    assert all(round(shares[k] * expected[k], 6) == round(shares[k] * expected[k]) for k in expected)  # whole objects
