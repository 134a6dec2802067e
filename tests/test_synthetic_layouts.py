"""The embedded generator's layout mix: weighed as configured, part of the dataset's identity."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from captioner.data.synthetic import region_of, write_dataset


def _layouts(root) -> Counter:
    images = json.loads((root / "annotations" / "captions_train.json").read_text())["images"]
    return Counter(im["layout"].partition(":")[0] for im in images)


def test_the_mix_follows_its_weights_and_rewrites_the_dataset(tmp_path):
    sizes = {"train": 400, "test": 2}
    counts = _layouts(write_dataset(tmp_path, seed=1, sizes=sizes, layouts={"single": 3, "pair": 3, "triple": 2, "regions": 2}))
    assert set(counts) == {"single", "pair", "triple", "regions"}
    assert 60 < counts["regions"] < 110  # weight 2 of 10
    counts = _layouts(write_dataset(tmp_path, seed=1, sizes=sizes, layouts={"regions": 1, "triple": 1}))
    assert set(counts) == {"regions", "triple"}  # another mix is another dataset: written again
    assert json.loads((tmp_path / "manifest.json").read_text())["layouts"] == {"regions": 1, "triple": 1}


def test_regions_put_two_objects_in_two_corners(tmp_path):
    root = write_dataset(tmp_path, seed=2, sizes={"train": 200, "test": 2}, layouts={"regions": 1})
    for im in json.loads((root / "annotations" / "captions_train.json").read_text())["images"]:
        corners = [region_of(o["x"], o["y"]) for o in im["scene"]]
        assert len(corners) == 2 and corners[0] != corners[1]


def test_an_unknown_layout_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"data\.synthetic\.layouts"):
        write_dataset(tmp_path, seed=0, sizes={"train": 5}, layouts={"grid": 1})


def test_the_default_mix_has_no_regions_and_keeps_its_scenes_and_manifest(tmp_path):
    """regions is opt-in: at weight 0 the random stream, the scenes and the manifest are the 1-3-shape world's."""
    from captioner.data.synthetic import build_split

    without = build_split("train", 300, 0, 64, 1, {"single": 4, "pair": 4, "triple": 2})
    assert build_split("train", 300, 0, 64, 1) == without
    root = write_dataset(tmp_path, seed=0, sizes={"train": 300, "test": 2})
    assert "regions" not in _layouts(root) and "layouts" not in json.loads((root / "manifest.json").read_text())
