"""Scene accuracy: right on every human reference, and it catches each kind of wrong caption."""

from __future__ import annotations

import json
import re

import pytest

from captioner.data.synthetic import region_of, write_dataset
from captioner.scene import Lexicon, human_scene_accuracy, load_scenes, parse, scene_accuracy, scenes_of


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("scenes"), seed=5, sizes={"train": 300, "test": 2},
                           layouts={"single": 3, "pair": 3, "triple": 2, "regions": 2})  # every layout
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
    assert set(report["by_layout"]) == {"single", "pair", "triple", "regions"}


def test_every_layout_round_trips_to_its_scene(split):
    """generator -> caption -> parse: each caption's mentions, bound to the places it names, are the scene."""
    scenes, references = split
    lexicon = Lexicon.embedded()
    seen = set()
    for i, caps in references.items():
        scene, kind = scenes[i], scenes[i].layout.partition(":")[0]
        seen.add(kind)
        for c in caps:
            mentions, positions, _ = parse(c, lexicon)
            assert [(m.shape, m.colour) for m in mentions] == [(o["shape"], o["colour"]) for o in scene.objects] or kind == "pair", c
            if kind == "regions":
                assert positions == [region_of(o["x"], o["y"]) for o in scene.objects], c
            elif kind == "single":
                assert positions == [scene.layout.partition(":")[2]], c
    assert seen == {"single", "pair", "triple", "regions"}


def _swap_corners(caption: str) -> str:
    """The caption with its two corners exchanged: the same objects and corners, bound the other way."""
    first, second = re.findall(r"(top left|top right|bottom left|bottom right)", caption)
    return re.sub(r"(top left|top right|bottom left|bottom right)", lambda m: second if m[1] == first else first, caption)


def test_regions_with_swapped_corners_are_wrong(split):
    scenes, references = split
    checked = 0
    for i, caps in references.items():
        objects = scenes[i].objects
        if scenes[i].layout != "regions" or (objects[0]["shape"], objects[0]["colour"]) == (objects[1]["shape"], objects[1]["colour"]):
            continue
        swapped = _swap_corners(caps[0])
        report = scene_accuracy({i: scenes[i]}, {i: swapped})
        assert report["accuracy"] == 0.0 and report["errors"]["position"] == 1, (caps[0], swapped, report)
        reordered = re.sub(r"(?i)^(.+?) and (.+?)\.?$", r"\2 and \1", caps[0]) if " and " in caps[0] else None
        if reordered and not reordered.lower().startswith("in the") and caps[0][0] in "Aa":
            assert scene_accuracy({i: scenes[i]}, {i: reordered})["accuracy"] == 1.0, reordered  # any order of pairs
        checked += 1
    assert checked > 20


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
        ("colour", "regions", r"\b(red|blue|green|yellow|purple)\b", lambda c: re.sub(r"\b(red|blue|green|yellow|purple)\b", lambda m: COLOURS[m[1]], c, count=1)),
        ("position", "regions", r"^(A|a) .+ (in|at) the top left", lambda c: re.sub(r"top left", "center", c)),
        ("position", "regions", r" in the top right", lambda c: c.replace(" in the top right", " on the right")),
        ("count", "regions", r" and a ", lambda c: c.split(" and a ")[0]),
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
