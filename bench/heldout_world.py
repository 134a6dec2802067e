"""A held-out synthetic world, to check that a recipe tuned on the embedded one carries to a world it never saw.

    python bench/heldout_world.py write /tmp/heldout                 # 3,000 / 200 / 200 images in COCO format
    python -m captioner.train data.splits.train.annotations=/tmp/heldout/annotations/captions_train.json \\
        data.splits.train.images=/tmp/heldout/images/train ... data.cache_dir=/tmp/heldout/cache   (printed by `write`)
    python bench/heldout_world.py score /tmp/heldout outputs/train/runs/<run>/captions_test.json
    python bench/heldout_world.py probe /tmp/heldout /tmp/heldout/cache/pretrained/clip/clip.pt   # can a tower tell the shapes?
    python bench/heldout_world.py binding /tmp/heldout outputs/train/runs/<run>/checkpoints/last.ckpt   # does the decoder bind them?

Nothing here comes from `captioner/data/synthetic.py`: other shapes (ring, cross, star, hexagon), other
colours (cyan, pink, orange, lime, white) on a dark ground, 96-pixel images, another phrasing, and nine
absolute places on a 3 x 3 grid that does not line up with a 4 x 4 patch grid. A scene holds one object or
two in different places, each named with its own place ("a cyan ring in the top left and a pink cross in the
centre"); a caption is right only when every object it names has the right shape, colour and place and it
names each object of the scene once, so the same two objects with their places swapped are wrong.

The ground truth is stored as `images[].truth` (not `scene`), so the captioner's own scene accuracy, which
knows only the embedded world's phrasing, leaves this data alone; `score` reads it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

SIZE = 96
BACKGROUND = (28, 30, 36)
COLOURS = {"cyan": (20, 200, 220), "pink": (240, 110, 180), "orange": (245, 140, 20), "lime": (150, 230, 40), "white": (235, 235, 235)}
COLOURS_WORDS = {c: (c,) for c in COLOURS}
SHAPES = ("ring", "cross", "star", "hexagon")
SHAPE_WORDS = {"ring": ("ring", "hoop"), "cross": ("cross", "plus sign"), "star": ("star",), "hexagon": ("hexagon", "six-sided figure")}
ROWS = {"top": 1 / 6, "middle": 3 / 6, "bottom": 5 / 6}
COLUMNS = {"left": 1 / 6, "middle": 3 / 6, "right": 5 / 6}
PLACES = {  # place -> (column, row) of the 3 x 3 grid
    "top left": ("left", "top"), "top": ("middle", "top"), "top right": ("right", "top"),
    "left": ("left", "middle"), "centre": ("middle", "middle"), "right": ("right", "middle"),
    "bottom left": ("left", "bottom"), "bottom": ("middle", "bottom"), "bottom right": ("right", "bottom"),
}
PLACE_WORDS = {  # how a place is written after "in the" / "at the"
    "top left": ("top left", "upper left"), "top": ("top", "top middle"), "top right": ("top right", "upper right"),
    "left": ("left", "middle left"), "centre": ("centre", "middle"), "right": ("right", "middle right"),
    "bottom left": ("bottom left", "lower left"), "bottom": ("bottom", "bottom middle"), "bottom right": ("bottom right", "lower right"),
}


def draw(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(r / 3)))
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "star":
        points = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                   cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(points, fill=fill)
    else:  # hexagon
        d.polygon([(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)], fill=fill)


def sample(rng: random.Random) -> list[dict]:
    places = rng.sample(sorted(PLACES), 1 if rng.random() < 0.4 else 2)
    return [{"shape": rng.choice(SHAPES), "colour": rng.choice(sorted(COLOURS)), "place": p} for p in places]


def render(objects: list[dict], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    d = ImageDraw.Draw(image)
    for o in objects:
        column, row = PLACES[o["place"]]
        cx = COLUMNS[column] * SIZE + rng.uniform(-4, 4)
        cy = ROWS[row] * SIZE + rng.uniform(-4, 4)
        draw(d, o["shape"], cx, cy, rng.uniform(9, 13), COLOURS[o["colour"]])
    return image


def phrase(o: dict, rng: random.Random) -> tuple[str, str]:
    """(the object, its place) in words."""
    return f"{rng.choice(COLOURS_WORDS[o['colour']])} {rng.choice(SHAPE_WORDS[o['shape']])}", rng.choice(PLACE_WORDS[o["place"]])


def describe(objects: list[dict], rng: random.Random) -> str:
    parts = []
    for o in rng.sample(objects, len(objects)):
        thing, place = phrase(o, rng)
        a = "an" if thing[0] in "aeiou" else "a"
        parts.append(rng.choice((f"{a} {thing} in the {place}", f"{a} {thing} at the {place}", f"in the {place} {a} {thing}")))
    opening = rng.choice(("", "", "a dark picture with ", "there is ", "we see "))
    return (opening + (" and " if rng.random() < 0.7 else ", ").join(parts)).strip()


def write(root: Path, sizes: dict[str, int], seed: int) -> None:
    rng = random.Random(seed)
    next_image, next_caption = 1, 1
    for split, count in sizes.items():
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for _ in range(count):
            objects = sample(rng)
            name = f"{split}_{next_image:06d}.png"
            render(objects, rng).save(folder / name)
            images.append({"id": next_image, "file_name": name, "width": SIZE, "height": SIZE, "truth": objects})
            for _ in range(5):
                annotations.append({"id": next_caption, "image_id": next_image, "caption": describe(objects, rng)})
                next_caption += 1
            next_image += 1
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    overrides = " ".join(
        f"data.splits.{s}.annotations={root}/annotations/captions_{s}.json data.splits.{s}.images={root}/images/{s}" for s in sizes
    )
    print(f"wrote {sum(sizes.values())} images to {root}; train with:\n  python -m captioner.train {overrides} data.cache_dir={root}/cache")


def _lexicon() -> list[tuple[list[str], str, str]]:
    """(words, kind, value), longest first: a place word inside a longer place phrase is that phrase."""
    entries = [(w.split(), "colour", c) for c, words in COLOURS_WORDS.items() for w in words]
    entries += [(w.split(), "shape", s) for s, words in SHAPE_WORDS.items() for w in words]
    entries += [(w.split(), "place", p) for p, words in PLACE_WORDS.items() for w in words]
    return sorted(entries, key=lambda e: -len(e[0]))


def parse(caption: str) -> list[tuple[str, str, str]] | None:
    """[(colour, shape, place)] of every object the caption names, or None where it cannot be read as such.

    Each clause (split at "and" and commas) must name exactly one colour, one shape and one place."""
    lexicon = _lexicon()
    found = []
    for clause in re.split(r",| and ", caption.lower()):
        words = re.findall(r"[a-z-]+", clause)
        seen: dict[str, list[str]] = {"colour": [], "shape": [], "place": []}
        i = 0
        while i < len(words):
            for phrase_words, kind, value in lexicon:
                if words[i : i + len(phrase_words)] == phrase_words:
                    seen[kind].append(value)
                    i += len(phrase_words)
                    break
            else:
                i += 1
        if not any(seen.values()):
            continue
        if any(len(v) != 1 for v in seen.values()):
            return None
        found.append((seen["colour"][0], seen["shape"][0], seen["place"][0]))
    return found


def right(caption: str, objects: list[dict]) -> bool:
    named = parse(caption)
    return named is not None and Counter(named) == Counter((o["colour"], o["shape"], o["place"]) for o in objects)


def score(root: Path, captions_file: Path) -> dict:
    truth = {im["id"]: im["truth"] for im in json.loads((root / "annotations" / "captions_test.json").read_text())["images"]}
    captions = {int(r["image_id"]): r["caption"] for r in json.loads(captions_file.read_text())}
    if not captions or set(captions) - set(truth):
        raise SystemExit(f"error: {captions_file} holds captions of images this world's test split ({root}) does not have: "
                         "score the captions_test.json of a run trained on it")
    kinds = {1: "one object", 2: "two objects"}
    one_colour = "two of one colour"  # pairs where only the shape tells which object is where; also counted in "two objects"
    totals, correct, examples = Counter(), Counter(), []
    for image_id, caption in captions.items():
        objects = truth[image_id]
        groups = [kinds[len(objects)]] + ([one_colour] if len(objects) == 2 and objects[0]["colour"] == objects[1]["colour"] else [])
        ok = right(caption, objects)
        for kind in groups:
            totals[kind] += 1
            correct[kind] += ok
        if not ok and len(examples) < 5:
            examples.append((caption, ", ".join(f"{o['colour']} {o['shape']} @ {o['place']}" for o in objects)))
    table = Table(title=f"held-out world: {captions_file}")
    for column in ("layout", "right", "images"):
        table.add_column(column, justify="left" if column == "layout" else "right")
    for kind in [*kinds.values(), one_colour]:
        if totals[kind]:
            table.add_row(kind, f"{100 * correct[kind] / totals[kind]:.1f} %", str(totals[kind]))
    all_right, all_images = sum(correct[k] for k in kinds.values()), sum(totals[k] for k in kinds.values())
    table.add_row("all", f"{100 * all_right / all_images:.1f} %", str(all_images))
    console = Console()
    console.print(table)
    for caption, scene in examples:
        console.print(f"  wrong: {caption!r}  (scene: {scene})")
    return {"accuracy": all_right / all_images, **{k: correct[k] / totals[k] for k in totals}}


def place_cells(place: str, side: int) -> list[int]:
    """The row-major indices of the patches that cover `place` on a side x side patch grid (side a multiple of 3)."""
    if side % 3:
        raise ValueError(f"a {side} x {side} patch grid does not split into the world's 3 x 3 places")
    column_name, row_name = PLACES[place]
    column, row, per = list(COLUMNS).index(column_name), list(ROWS).index(row_name), side // 3
    return [(row * per + i) * side + column * per + j for i in range(per) for j in range(per)]


def scenes(root: Path, splits: tuple[str, ...], count: int) -> tuple[list[Path], list[list[dict]]]:
    """(image paths, truths) of the scenes of `count` objects in `splits`, in order."""
    paths, truths = [], []
    for split in splits:
        images = json.loads((root / "annotations" / f"captions_{split}.json").read_text())["images"]
        chosen = [im for im in images if len(im["truth"]) == count]
        paths += [root / "images" / split / im["file_name"] for im in chosen]
        truths += [im["truth"] for im in chosen]
    return paths, truths


def probe(root: Path, clips: list[Path], layer: int) -> None:
    """How well each tower's features tell the shapes: softmax regression (full-batch L-BFGS) fitted on the
    training split, scored on the validation and test splits. Lone objects: every patch token and the pooled
    vector. Two objects: each object's shape from the tokens of its own place only (the 2 x 2 patches of a
    6 x 6 grid), with the pairs of one colour apart: the scenes whose binding only the shapes tell."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from captioner.models.encoder import ClipEncoder

    def fit(x: torch.Tensor, y: torch.Tensor, held_x: torch.Tensor) -> torch.Tensor:
        mean, std = x.mean(0), x.std(0) + 1e-6
        linear = torch.nn.Linear(x.shape[1], len(SHAPES))
        optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(linear((x - mean) / std), y) + 1e-4 * linear.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            return linear((held_x - mean) / std).argmax(1)

    def encode(encoder: ClipEncoder, paths: list[Path]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return encoder(torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in paths]))

    def at_places(tokens: torch.Tensor, truths: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(each object's place tokens, flattened; its shape; whether its scene's two objects share a colour)"""
        side = math.isqrt(tokens.shape[1])
        x, y, one_colour = [], [], []
        for row_tokens, truth in zip(tokens, truths):
            for thing in truth:
                x.append(row_tokens[place_cells(thing["place"], side)].flatten())
                y.append(SHAPES.index(thing["shape"]))
                one_colour.append(truth[0]["colour"] == truth[1]["colour"])
        return torch.stack(x), torch.tensor(y), torch.tensor(one_colour)

    def pct(right: torch.Tensor) -> str:
        return f"{100 * right.float().mean():.1f} %"

    ones_train, ones_held = scenes(root, ("train",), 1), scenes(root, ("val", "test"), 1)
    twos_train, twos_held = scenes(root, ("train",), 2), scenes(root, ("val", "test"), 2)
    label = lambda truths: torch.tensor([SHAPES.index(t[0]["shape"]) for t in truths])  # noqa: E731
    table = Table(title=f"shape probe, block {layer}: lone objects ({len(ones_train[0])} training scenes, "
                        f"{len(ones_held[0])} held out); two objects, each from its own place's tokens "
                        f"({len(twos_train[0])} training scenes, {len(twos_held[0])} held out)")
    for column in ("tower", "lone: patch tokens", "lone: pooled vector", "two: at its place", "two of one colour", "two colours"):
        table.add_column(column, justify="left" if column == "tower" else "right")
    torch.manual_seed(0)
    for clip in clips:
        encoder = ClipEncoder({"name": str(clip), "layer": layer})
        lone = [encode(encoder, paths) for paths in (ones_train[0], ones_held[0])]
        cells = []
        for key in ("patch_tokens", "clip_features"):
            predicted = fit(lone[0][key].flatten(1), label(ones_train[1]), lone[1][key].flatten(1))
            cells.append(pct(predicted == label(ones_held[1])))
        x, y, _ = at_places(encode(encoder, twos_train[0])["patch_tokens"], twos_train[1])
        held_x, held_y, one_colour = at_places(encode(encoder, twos_held[0])["patch_tokens"], twos_held[1])
        right = fit(x, y, held_x) == held_y
        cells += [pct(right), pct(right[one_colour]), pct(right[~one_colour])]
        table.add_row(str(clip), *cells)
    Console().print(table)


def binding_texts(objects: list[dict]) -> list[tuple[str, str, str]]:
    """(kind, own, other) for each object of a two-object scene: "a <colour> <shape> in the <place>" with the object's
    own place and with the other object's. kind is "two of one colour" where only the shapes tell them apart. Two
    identical objects give nothing: either place is right."""
    kind = "two of one colour" if objects[0]["colour"] == objects[1]["colour"] else "two colours"

    def text(o: dict, place: str) -> str:
        thing = f"{COLOURS_WORDS[o['colour']][0]} {SHAPE_WORDS[o['shape']][0]}"
        return f"{'an' if thing[0] in 'aeiou' else 'a'} {thing} in the {PLACE_WORDS[place][0]}"

    return [(kind, text(o, o["place"]), text(o, other["place"])) for o, other in (objects, objects[::-1])
            if (o["shape"], o["colour"]) != (other["shape"], other["colour"])]


def binding(root: Path, checkpoint: Path) -> dict:
    """Does a trained captioner's decoder bind each object of a two-object test scene to its own place?

    It scores `binding_texts` through the model (teacher forcing) and counts how often the object's own place is the
    likelier. Where the two objects share a colour only the shape tells them apart: 50 % there is chance."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from captioner.checkpoint import load_module
    from captioner.models.decoder import caption_ids

    model = load_module(checkpoint).model.eval()
    totals, right = Counter(), Counter()
    with torch.no_grad():
        for path, truth in zip(*scenes(root, ("test",), 2)):
            prefix = model.prefix({"pixels": model.encoder.preprocess(Image.open(path).convert("RGB"))[None]})
            for kind, own, other in binding_texts(truth):
                tokens = [caption_ids(model.tokenizer, t) for t in (own, other)]
                logp, _ = model.token_log_probs(prefix.expand(2, -1, -1), tokens)
                totals[kind] += 1
                right[kind] += bool(logp[0].sum() > logp[1].sum())
    table = Table(title=f"binding: is each object's own place likelier than the other's? ({checkpoint})")
    for column in ("pairs", "own place likelier", "objects"):
        table.add_column(column, justify="left" if column == "pairs" else "right")
    for kind in ("two colours", "two of one colour"):
        table.add_row(kind, f"{100 * right[kind] / max(1, totals[kind]):.1f} %", str(totals[kind]))
    Console().print(table)
    return {k: right[k] / totals[k] for k in totals}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write", help="write the world in COCO format")
    w.add_argument("root", type=Path)
    w.add_argument("--train", type=int, default=3000)
    w.add_argument("--val", type=int, default=200)
    w.add_argument("--test", type=int, default=200)
    w.add_argument("--seed", type=int, default=7)
    s = commands.add_parser("score", help="scene accuracy of a run's test captions")
    s.add_argument("root", type=Path)
    s.add_argument("captions", type=Path, help="a run's captions_test.json")
    p = commands.add_parser("probe", help="how well towers' features tell the shapes, alone and at their places")
    p.add_argument("root", type=Path)
    p.add_argument("clips", type=Path, nargs="+", help="CLIP state dicts (clip.pt) to compare")
    p.add_argument("--layer", type=int, default=-1, help="the block whose patch tokens are probed (-1: the last)")
    b = commands.add_parser("binding", help="whether a trained captioner reads each object's place by its shape")
    b.add_argument("root", type=Path)
    b.add_argument("checkpoint", type=Path, help="a run's checkpoints/last.ckpt")
    args = parser.parse_args(argv)
    if args.command == "write":
        write(args.root, {"train": args.train, "val": args.val, "test": args.test}, args.seed)
    elif args.command == "score":
        score(args.root, args.captions)
    elif args.command == "binding":
        binding(args.root, args.checkpoint)
    else:
        probe(args.root, args.clips, args.layer)


if __name__ == "__main__":
    sys.exit(main())
