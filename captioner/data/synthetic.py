"""The embedded default dataset: rendered scenes of 1-3 shapes with five human-like captions each.

Four layouts: one object at a named place (`single:<position>`), two side by side or one above the
other described by their relation (`pair:left`, `pair:above`), three in a row named left to right
(`triple`), and two objects in two of the image's four corners, each named with its own corner
(`regions`: "a red circle in the top left and a blue square in the bottom right"). The last tests
absolute position: a caption that names both objects and both corners but swaps them is wrong.

Everything is a pure function of the seed. The dataset is written in the official COCO caption
format (`images/{split}/*.png` + `annotations/captions_{split}.json`) so the same loader reads it
as real COCO. Each image record also stores its scene (`scene`: every object's shape, colour, size and
centre; `layout`), the ground truth `captioner/scene.py` checks captions against. The tokenizer, CLIP
and GPT-2 of the embedded default are pretrained on the training split (`captioner/pretraining.py`).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

FORMAT_VERSION = 2  # bump when rendering or captions change: invalidates written datasets

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")

# Synonyms with weights: the first word is the one most annotators use, so a consensus caption
# exists (as on COCO) and the leave-one-out human baseline is below a model that finds it.
SYNONYMS = {
    "circle": (("circle", 6), ("disc", 2), ("round shape", 1)),
    "square": (("square", 6), ("box", 2), ("block", 1)),
    "triangle": (("triangle", 7), ("triangular shape", 2)),
    "diamond": (("diamond", 6), ("rhombus", 2)),
    "small": (("small", 6), ("little", 2), ("tiny", 1)),
    "large": (("large", 5), ("big", 4)),
}
POSITIONS = {  # name -> (centre x, centre y) as a fraction of the image side
    "left": (0.22, 0.5),
    "right": (0.78, 0.5),
    "top": (0.5, 0.22),
    "bottom": (0.5, 0.78),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": (("on the left", 6), ("on the left side", 3), ("at the left of the picture", 1)),
    "right": (("on the right", 6), ("on the right side", 3), ("at the right of the picture", 1)),
    "top": (("at the top", 6), ("near the top", 3), ("at the top of the picture", 1)),
    "bottom": (("at the bottom", 6), ("near the bottom", 3), ("at the bottom of the picture", 1)),
    "center": (("in the middle", 6), ("in the center", 3), ("in the middle of the picture", 1)),
}
REGIONS = {  # the image's quadrants: name -> (centre x, centre y)
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
REGION_PHRASES = {r: ((f"in the {r}", 6), (f"in the {r} corner", 3), (f"at the {r}", 1)) for r in REGIONS}
# Each object's corner is named next to it, before or after: a caption lists (object, corner) pairs.
REGION_TEMPLATES = (
    ("a {a} {where_a} and a {b} {where_b}", 6),
    ("a {a} {where_a}, a {b} {where_b}", 2),
    ("{where_a} a {a} and {where_b} a {b}", 2),
)
# The default mix (relative weights). `regions` is opt-in (data.synthetic.layouts): the default recipe does not
# yet bind objects to corners well enough to carry it (docs/results/binding.md). A zero weight leaves the random
# stream, and so the default dataset, exactly as it is without the layout.
LAYOUTS = {"single": 4, "pair": 4, "triple": 2, "regions": 0}
SINGLE_TEMPLATES = (
    ("a {size} {colour} {shape} {where}", 6),
    ("there is a {size} {colour} {shape} {where}", 3),
    ("a {colour} {shape} {where}", 2),
    ("{where} there is a {size} {colour} {shape}", 1),
)
PAIR_TEMPLATES = (  # (template, relation seen from the first object, weight)
    ("a {a} to the left of a {b}", "left", 6),
    ("a {b} to the right of a {a}", "left", 2),
    ("a {a} next to a {b}", "left", 2),
    ("a {a} above a {b}", "above", 6),
    ("a {b} below a {a}", "above", 2),
    ("a {a} on top of a {b}", "above", 1),
)
TRIPLE_TEMPLATES = (
    ("a {a}, a {b} and a {c} in a row", 6),
    ("three shapes: a {a}, a {b} and a {c}", 3),
    ("a row of a {a}, a {b} and a {c}", 1),
)


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of the image side
    y: float


def _pick(rng: random.Random, options: tuple) -> str:
    words, weights = zip(*[(o[0], o[-1]) for o in options])
    return rng.choices(words, weights=weights)[0]


def region_of(x: float, y: float) -> str:
    """The quadrant (a `REGIONS` name) whose centre is nearest to (x, y)."""
    return min(REGIONS, key=lambda r: (REGIONS[r][0] - x) ** 2 + (REGIONS[r][1] - y) ** 2)


def sample_scene(rng: random.Random, layouts: dict[str, float] | None = None) -> tuple[list[Thing], str]:
    """A scene and its layout: `single:<position>`, `pair:left`, `pair:above`, `triple` or `regions`,
    the kind drawn with the relative weights `layouts` (default `LAYOUTS`)."""

    def thing(x: float, y: float, sizes=SIZES) -> Thing:
        return Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(sizes), x, y)

    jitter = lambda: rng.uniform(-0.04, 0.04)  # noqa: E731 - keeps positions from being pixel-exact
    weights = layouts or LAYOUTS
    unknown = set(weights) - set(LAYOUTS)
    if unknown:
        raise ValueError(f"unknown layouts {sorted(unknown)}: choose from {sorted(LAYOUTS)} (data.synthetic.layouts)")
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    if kind == "regions":  # two corners, named in a random order
        return [thing(x + jitter(), y + jitter()) for x, y in (REGIONS[r] for r in rng.sample(list(REGIONS), 2))], "regions"
    if kind == "single":
        where = rng.choice(list(POSITIONS))
        x, y = POSITIONS[where]
        return [thing(x + jitter(), y + jitter())], f"single:{where}"
    if kind == "pair":
        relation = rng.choice(("left", "above"))
        a, b = (0.27, 0.73)
        if relation == "left":
            return [thing(a + jitter(), 0.5 + jitter()), thing(b + jitter(), 0.5 + jitter())], "pair:left"
        return [thing(0.5 + jitter(), a + jitter()), thing(0.5 + jitter(), b + jitter())], "pair:above"
    # three in a row are all small so they never touch
    return [thing(x + jitter(), 0.5 + jitter(), ("small",)) for x in (0.18, 0.5, 0.82)], "triple"


def render(things: list[Thing], image_size: int, rng: random.Random) -> Image.Image:
    shade = rng.randint(225, 250)
    image = Image.new("RGB", (image_size, image_size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for t in things:
        r = image_size * (0.2 if t.size == "large" else 0.12)  # small ones still span ~2x2 ViT patches
        cx, cy = t.x * image_size, t.y * image_size
        colour = COLOURS[t.colour]
        if t.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif t.shape == "square":
            draw.rectangle((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=colour)
        elif t.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    return image


def describe(thing: Thing, rng: random.Random, with_size: bool = True) -> str:
    words = [_pick(rng, SYNONYMS[thing.size])] if with_size else []
    return " ".join(words + [thing.colour, _pick(rng, SYNONYMS[thing.shape])])


def caption(things: list[Thing], layout: str, rng: random.Random) -> str:
    if layout.startswith("single:"):
        template = _pick(rng, SINGLE_TEMPLATES)
        where = _pick(rng, POSITION_PHRASES[layout.split(":")[1]])
        t = things[0]
        size, shape = _pick(rng, SYNONYMS[t.size]), _pick(rng, SYNONYMS[t.shape])
        text = template.format(size=size, colour=t.colour, shape=shape, where=where)
    elif layout == "regions":
        a, b = things
        text = _pick(rng, REGION_TEMPLATES).format(
            a=describe(a, rng), where_a=_pick(rng, REGION_PHRASES[region_of(a.x, a.y)]),
            b=describe(b, rng), where_b=_pick(rng, REGION_PHRASES[region_of(b.x, b.y)]),
        )
    elif layout.startswith("pair:"):
        relation = layout.split(":")[1]
        options = tuple((t, w) for t, rel, w in PAIR_TEMPLATES if rel == relation)
        text = _pick(rng, options).format(a=describe(things[0], rng), b=describe(things[1], rng))
    else:
        parts = [describe(t, rng, with_size=False) for t in things]
        text = _pick(rng, TRIPLE_TEMPLATES).format(a=parts[0], b=parts[1], c=parts[2])
    # like COCO annotators: most start with a capital letter, some end with a full stop
    text = text[0].upper() + text[1:] if rng.random() < 0.7 else text
    return text + "." if rng.random() < 0.4 else text


def build_split(split: str, count: int, seed: int, image_size: int, first_id: int, layouts: dict | None = None) -> tuple[list, list]:
    """(images, annotations) records in COCO format; image files are rendered by `write_dataset`."""
    rng = random.Random(f"{seed}:{split}")
    images, annotations = [], []
    for i in range(count):
        image_id = first_id + i
        things, layout = sample_scene(rng, layouts)
        images.append(
            {
                "id": image_id,
                "file_name": f"{image_id:08d}.png",
                "width": image_size,
                "height": image_size,
                "scene": [t.__dict__ for t in things],
                "layout": layout,
            }
        )
        for k in range(5):
            annotations.append({"id": image_id * 10 + k, "image_id": image_id, "caption": caption(things, layout, rng)})
    return images, annotations


def write_dataset(
    root: str | Path,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    image_size: int = 64,
    layouts: dict[str, float] | None = None,
) -> Path:
    """Write the dataset under `root` unless an identical one is already there; returns `root`.

    `layouts` weighs the layouts of every split's scenes ({kind: relative weight}; default `LAYOUTS`)."""
    root = Path(root)
    sizes = dict(sizes or {"train": 8000, "val": 200, "test": 200})
    layouts = dict(layouts or LAYOUTS)
    spec = {"format_version": FORMAT_VERSION, "seed": seed, "sizes": sizes, "image_size": image_size}
    if layouts != LAYOUTS:  # the default mix keeps the manifest (and every cache keyed by it) as it was
        spec["layouts"] = layouts
    manifest = root / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()) == spec:
        return root
    if manifest.exists():
        manifest.unlink()  # rewrite below; the manifest goes last, so a partial write is never trusted
    if (root / "features").exists():
        shutil.rmtree(root / "features")  # extracted from the images being replaced: stale

    first_id = 1
    for split, count in sizes.items():
        images, annotations = build_split(split, count, seed, image_size, first_id, layouts)
        first_id += count
        image_dir = root / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"{seed}:{split}:render")
        for record in tqdm(images, desc=f"render {split}", leave=False, mininterval=1):
            things = [Thing(**t) for t in record["scene"]]
            render(things, image_size, rng).save(image_dir / record["file_name"])
        coco = {
            "info": {"description": f"captioner synthetic shapes, seed {seed}", "version": str(FORMAT_VERSION)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
        }
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(coco))
    manifest.write_text(json.dumps(spec, indent=2))
    return root
