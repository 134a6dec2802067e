"""Scene accuracy: does a caption name exactly the objects of its (synthetic) scene?

A metric that can be won by phrasing is not evidence: on data whose ground truth we generate we
check captions against it. The embedded dataset stores each image's scene in its COCO annotations
(`images[].scene`: shape, colour, size, x, y of every object; `images[].layout`: `single:<position>`,
`pair:left`, `pair:above`, `triple` or `regions`). A caption is right when it names every object and
nothing else, each with the right shape (any synonym), colour and size (where it states one), and the
right position (single objects), relation (pairs: "to the left of", "below", ...), order (rows, left
to right) or corner (regions: each object's corner named next to it, "a red circle in the top left";
the corners bind to the objects in the order both are named, so swapped corners are wrong). Each
wrong caption is counted once under every attribute it gets wrong.

The lexicon is the embedded generator's (`captioner/data/synthetic.py`) plus every attribute value
found in the scenes themselves, so data from another generator with its own shapes and colours is
still parsed; a layout this module does not know is checked as a set of objects without positions.
Data without scenes (COCO) has no scene accuracy: `load_scenes` returns None.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from captioner.data import synthetic

ATTRIBUTES = ("shape", "colour", "size", "position", "count")


@dataclass(frozen=True)
class Scene:
    objects: tuple[Mapping, ...]  # {shape, colour, size, x, y}, in the generator's order
    layout: str


@dataclass
class Lexicon:
    """Phrase -> attribute value. Phrases are lower-case word sequences; the longest match wins."""

    shape: dict[str, str] = field(default_factory=dict)
    colour: dict[str, str] = field(default_factory=dict)
    size: dict[str, str] = field(default_factory=dict)
    position: dict[str, str] = field(default_factory=dict)
    # relation phrase -> (axis of the pair layout, first-named object is the scene's second, order matters)
    relation: dict[str, tuple[str, bool, bool]] = field(default_factory=dict)

    @classmethod
    def embedded(cls) -> "Lexicon":
        def words(options: Mapping[str, tuple]) -> dict[str, str]:
            return {phrase: value for value, choices in options.items() for phrase, _ in choices}

        return cls(
            shape=words({s: synthetic.SYNONYMS[s] for s in synthetic.SHAPES}),
            colour={c: c for c in synthetic.COLOURS},
            size=words({s: synthetic.SYNONYMS[s] for s in synthetic.SIZES}),
            position={**words(synthetic.POSITION_PHRASES), "center": "center", "middle": "center",
                      "left": "left", "right": "right", "top": "top", "bottom": "bottom",
                      **words(synthetic.REGION_PHRASES), **{r: r for r in synthetic.REGIONS}},
            relation={
                "to the left of": ("left", False, True),
                "left of": ("left", False, True),
                "to the right of": ("left", True, True),
                "right of": ("left", True, True),
                "next to": ("left", False, False),  # true whichever of the two is named first
                "beside": ("left", False, False),
                "above": ("above", False, True),
                "on top of": ("above", False, True),
                "over": ("above", False, True),
                "below": ("above", True, True),
                "under": ("above", True, True),
                "beneath": ("above", True, True),
            },
        )

    def extended(self, scenes: Iterable[Scene]) -> "Lexicon":
        """This lexicon plus each attribute value of `scenes` as its own name."""
        for scene in scenes:
            for o in scene.objects:
                for attribute in ("shape", "colour", "size"):
                    value = str(o[attribute])
                    getattr(self, attribute).setdefault(value.lower(), value)
        return self


def load_scenes(annotation_file: str | Path) -> dict[int, Scene] | None:
    """{image_id: Scene} from a COCO captions file whose images carry `scene` and `layout`, else None."""
    path = Path(annotation_file)
    if not path.is_file():
        return None
    images = json.loads(path.read_text()).get("images", [])
    if not images or not all("scene" in im and "layout" in im for im in images):
        return None
    return {int(im["id"]): Scene(tuple(im["scene"]), str(im["layout"])) for im in images}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _phrases(lexicon: Lexicon) -> list[tuple[tuple[str, ...], str, object]]:
    """(words, kind, value) for every phrase, longest first, so "round shape" beats "round"."""
    table = []
    for kind in ("shape", "colour", "size", "position", "relation"):
        for phrase, value in getattr(lexicon, kind).items():
            table.append((tuple(_words(phrase)), kind, value))
    return sorted(table, key=lambda t: -len(t[0]))


@dataclass
class Mention:
    shape: str
    colour: str | None = None
    size: str | None = None


def parse(caption: str, lexicon: Lexicon, phrases=None) -> tuple[list[Mention], list[str], list[tuple]]:
    """(object mentions in order, position values, relations) named by `caption`.

    A mention is a shape phrase with the colour and size words right before it ("a large red circle")."""
    phrases = phrases or _phrases(lexicon)
    words, spans, i = _words(caption), [], 0
    while i < len(words):
        for key, kind, value in phrases:
            if tuple(words[i : i + len(key)]) == key:
                spans.append((kind, value))
                i += len(key)
                break
        else:
            spans.append((None, words[i]))
            i += 1
    mentions, positions, relations = [], [], []
    for j, (kind, value) in enumerate(spans):
        if kind == "shape":
            mention = Mention(value)
            for back in range(j - 1, max(j - 3, -1), -1):  # up to two adjectives before the noun
                k, v = spans[back]
                if k == "colour" and mention.colour is None:
                    mention.colour = v
                elif k == "size" and mention.size is None:
                    mention.size = v
                else:
                    break
            mentions.append(mention)
        elif kind == "position":
            positions.append(value)
        elif kind == "relation":
            relations.append(value)
    return mentions, positions, relations


def _object_errors(mention: Mention, obj: Mapping) -> set[str]:
    wrong = set()
    if mention.shape != obj["shape"]:
        wrong.add("shape")
    if mention.colour != obj["colour"]:  # a colour must be named
        wrong.add("colour")
    if mention.size is not None and mention.size != obj["size"]:
        wrong.add("size")
    return wrong


def _ordered_errors(mentions: list[Mention], objects) -> set[str]:
    return set().union(*(_object_errors(m, o) for m, o in zip(mentions, objects)))


def caption_errors(caption: str, scene: Scene, lexicon: Lexicon, phrases=None) -> set[str]:
    """The attributes `caption` gets wrong about `scene` (empty: the caption is right)."""
    mentions, positions, relations = parse(caption, lexicon, phrases)
    objects = list(scene.objects)
    if len(mentions) != len(objects):
        return {"count"}
    kind, _, where = scene.layout.partition(":")
    if kind == "single":
        wrong = _object_errors(mentions[0], objects[0])
        if positions != [where]:
            wrong.add("position")
        return wrong
    if kind == "pair":
        if len(relations) != 1 or relations[0][0] != where:
            # no relation or the wrong axis: still report what else is wrong, in the scene's order
            return _ordered_errors(mentions, objects) | {"position"}
        _, swapped, directed = relations[0]
        first = objects[::-1] if swapped else objects
        wrong = _ordered_errors(mentions, first)
        if wrong and not directed:
            wrong = min(wrong, _ordered_errors(mentions, objects[::-1]), key=len)
        elif wrong and _ordered_errors(mentions, first[::-1]) == set():
            wrong = {"position"}  # the right objects, the wrong way round
        return wrong
    if kind == "regions":  # the i-th corner named belongs to the i-th object named
        truth = {synthetic.region_of(o["x"], o["y"]): o for o in objects}
        if len(positions) != len(mentions) or len(set(positions)) != len(positions) or set(positions) != set(truth):
            return _multiset_errors(mentions, objects) | {"position"}
        wrong = set().union(*(_object_errors(m, truth[p]) for m, p in zip(mentions, positions)))
        if wrong and _multiset_errors(mentions, objects) == set():
            wrong = {"position"}  # the right objects in the wrong corners
        return wrong
    if kind == "triple":  # named left to right
        wrong = _ordered_errors(mentions, sorted(objects, key=lambda o: o["x"]))
        if wrong and _multiset_errors(mentions, objects) == set():
            wrong = {"position"}  # the right objects in the wrong order
        return wrong
    return _multiset_errors(mentions, objects)  # a layout of another generator: objects only


def _multiset_errors(mentions: list[Mention], objects) -> set[str]:
    """Objects as a set, ignoring order: every mention must match a distinct object."""
    remaining = list(objects)
    wrong: set[str] = set()
    for m in mentions:
        best = min(range(len(remaining)), key=lambda i: len(_object_errors(m, remaining[i])))
        wrong |= _object_errors(m, remaining.pop(best))
    return wrong


def scene_accuracy(scenes: Mapping[int, Scene], captions: Mapping[int, str], lexicon: Lexicon | None = None) -> dict:
    """{"accuracy", "correct", "images", "errors": {attribute: captions wrong about it},
    "by_layout": {kind: accuracy}, "wrong": {image_id: [attributes]}} over the captioned images."""
    ids = [i for i in captions if i in scenes]
    if not ids:
        raise ValueError("no captioned image has a scene: scene accuracy needs the synthetic annotations")
    lexicon = (lexicon or Lexicon.embedded()).extended(scenes[i] for i in ids)
    phrases = _phrases(lexicon)
    errors, wrong, totals, right = Counter(), {}, Counter(), Counter()
    for i in ids:
        kind = scenes[i].layout.partition(":")[0]
        found = caption_errors(captions[i], scenes[i], lexicon, phrases)
        totals[kind] += 1
        if found:
            wrong[i] = sorted(found)
            errors.update(found)
        else:
            right[kind] += 1
    correct = len(ids) - len(wrong)
    return {
        "accuracy": correct / len(ids),
        "correct": correct,
        "images": len(ids),
        "errors": {a: errors[a] for a in ATTRIBUTES},
        "by_layout": {k: right[k] / totals[k] for k in sorted(totals)},
        "wrong": wrong,
    }


def human_scene_accuracy(scenes: Mapping[int, Scene], references: Mapping[int, list[str]]) -> float:
    """The share of human references that are right: every reference of every image scored."""
    flat = {(i, k): c for i, caps in references.items() if i in scenes for k, c in enumerate(caps)}
    lexicon = Lexicon.embedded().extended(scenes[i] for i, _ in flat)
    phrases = _phrases(lexicon)
    right = sum(not caption_errors(c, scenes[i], lexicon, phrases) for (i, _), c in flat.items())
    return right / len(flat)


def scenes_of(split: Mapping) -> dict[int, Scene] | None:
    """The scenes of a split config (`data.splits.<split>`): COCO-format annotations that carry them, else None."""
    if split.get("format", "coco") != "coco" or not split.get("annotations"):
        return None
    return load_scenes(split["annotations"])


def table(report: Mapping, title: str = "scene accuracy: captions naming exactly the right objects"):
    """A rich table of `scene_accuracy`'s report: the share right, by layout, and errors by attribute."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("right", f"{100 * report['accuracy']:.1f} % ({report['correct']}/{report['images']})")
    for kind, accuracy in report["by_layout"].items():
        t.add_row(f"  {kind}", f"{100 * accuracy:.1f} %")
    for attribute, count in report["errors"].items():
        t.add_row(f"wrong {attribute}", str(count))
    return t
