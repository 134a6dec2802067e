"""Scene accuracy: right on every human reference, and it catches each kind of wrong caption."""

from __future__ import annotations

import json
import re

import pytest

from captioner.data.synthetic import write_dataset
from captioner.scene import human_scene_accuracy, load_scenes, scene_accuracy, scenes_of


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("scenes"), seed=5, sizes={"train": 300, "test": 2})
    path = root / "annotations" / "captions_train.json"
    coco = json.loads(path.read_text())
    references: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        references.setdefault(a["image_id"], []).append(a["caption"])
    return load_scenes(path), references


def test_every_human_reference_is_right(split):
    scenes, references = split
    assert len(scenes) == 300
    assert human_scene_accuracy(scenes, references) == 1.0
    report = scene_accuracy(scenes, {i: caps[-1] for i, caps in references.items()})
    assert report["accuracy"] == 1.0 and report["correct"] == 300 and not report["wrong"]
    assert set(report["by_layout"]) == {"single", "pair", "triple"}


def _first(references, scenes, layout: str, pattern: str):
    """(image id, a reference) of `layout` whose text matches `pattern`."""
    for i, caps in references.items():
        if scenes[i].layout.startswith(layout):
            for c in caps:
                if re.search(pattern, c):
                    return i, c
    raise AssertionError(f"no {layout} reference matches {pattern!r}")


SWAPS = {"circle": "square", "square": "triangle", "triangle": "diamond", "diamond": "circle"}
COLOURS = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "purple", "purple": "red"}


@pytest.mark.parametrize(
    "attribute, layout, pattern, change",
    [
        ("shape", "single", r"\b(circle|square|triangle|diamond)\b", lambda c: re.sub(r"\b(circle|square|triangle|diamond)\b", lambda m: SWAPS[m[1]], c, count=1)),
        ("colour", "pair", r"\b(red|blue|green|yellow|purple)\b", lambda c: re.sub(r"\b(red|blue|green|yellow|purple)\b", lambda m: COLOURS[m[1]], c, count=1)),
        ("size", "single", r"\b(small|large)\b", lambda c: re.sub(r"\b(small|large)\b", lambda m: {"small": "large", "large": "small"}[m[1]], c, count=1)),
        ("position", "single", r"\bon the left\b", lambda c: c.replace("on the left", "on the right")),
        ("position", "pair", r"to the left of", lambda c: c.replace("to the left of", "to the right of")),
        ("position", "pair", r" above ", lambda c: c.replace(" above ", " to the left of ")),
        ("count", "triple", r", a ", lambda c: re.sub(r", a [a-z ]+? and a", " and a", c)),
        ("count", "single", r"^(A|a) ", lambda c: c + " and a red circle"),
    ],
)
def test_a_deliberately_wrong_caption_is_caught(split, attribute, layout, pattern, change):
    scenes, references = split
    image_id, right = _first(references, scenes, layout, pattern)
    wrong = change(right)
    assert wrong != right
    report = scene_accuracy({image_id: scenes[image_id]}, {image_id: wrong})
    assert report["accuracy"] == 0.0, (right, wrong)
    assert report["errors"][attribute] == 1, (right, wrong, report)
    assert scene_accuracy({image_id: scenes[image_id]}, {image_id: right})["accuracy"] == 1.0


def test_a_pair_named_the_other_way_round_is_right(split):
    scenes, references = split
    image_id, right = _first(references, scenes, "pair:left", r"to the left of")
    first, second = re.match(r"(?i)a (.+) to the left of a (.+?)\.?$", right).groups()
    flipped = f"a {second} to the right of a {first}"
    assert scene_accuracy({image_id: scenes[image_id]}, {image_id: flipped})["accuracy"] == 1.0
    swapped = f"a {second} to the left of a {first}"
    if first != second:
        assert scene_accuracy({image_id: scenes[image_id]}, {image_id: swapped})["errors"]["position"] == 1


def test_data_without_scenes_has_no_scene_accuracy(tmp_path, coco_mini):
    assert scenes_of({"format": "coco", "annotations": str(coco_mini / "annotations" / "captions_val2017_subset159.json")}) is None
    assert scenes_of({"format": "karpathy", "split_file": "x"}) is None
    assert load_scenes(tmp_path / "absent.json") is None
