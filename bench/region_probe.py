"""Linear probe: can a frozen CLIP's patch tokens say what is in each corner of a `regions` scene?

    python bench/region_probe.py                                  # the embedded default's data and CLIP
    python bench/region_probe.py --clip path/to/clip.pt --root data/synthetic

For every `regions` scene of the training split and each of its four corners, the label is the
content of that corner: one of the 20 shape x colour pairs, or empty. One linear classifier per
corner (softmax regression, full batch) reads it from (a) the corner's own patch tokens, concatenated,
(b) the pooled CLIP vector; held-out accuracy on a quarter of the scenes, for the pretrained CLIP and
a randomly initialised CLIP of the same shape. If the patch tokens carry each corner's content, a
captioner that binds objects to the wrong corners fails in its mapper or decoder, not in its tower.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.data.synthetic import COLOURS, REGIONS, SHAPES, region_of  # noqa: E402
from captioner.models.encoder import ClipEncoder  # noqa: E402

CLASSES = ["empty"] + [f"{c} {s}" for c in COLOURS for s in SHAPES]


def corner_cells(region: str, grid: int) -> list[int]:
    """Token indices (row-major grid) of the patches inside the quadrant `region`."""
    half = grid // 2
    row0 = 0 if region.startswith("top") else half
    col0 = 0 if region.endswith("left") else half
    return [r * grid + c for r in range(row0, row0 + half) for c in range(col0, col0 + half)]


def scenes_and_labels(root: Path, limit: int) -> tuple[list[Path], torch.Tensor]:
    """Image paths of the training split's `regions` scenes and their (S, 4) corner labels."""
    coco = json.loads((root / "annotations" / "captions_train.json").read_text())
    paths, labels = [], []
    for im in coco["images"]:
        if im["layout"] != "regions":
            continue
        content = {region_of(o["x"], o["y"]): CLASSES.index(f"{o['colour']} {o['shape']}") for o in im["scene"]}
        paths.append(root / "images" / "train" / im["file_name"])
        labels.append([content.get(r, 0) for r in REGIONS])
        if len(paths) == limit:
            break
    if not paths:
        raise SystemExit(f"no regions scenes in {root}: write the dataset with the default layout mix first")
    return paths, torch.tensor(labels)


@torch.no_grad()
def features(encoder: ClipEncoder, paths: list[Path]) -> dict[str, torch.Tensor]:
    pixels = torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])
    out = [encoder(pixels[i : i + 256]) for i in range(0, len(pixels), 256)]
    return {k: torch.cat([o[k] for o in out]) for k in out[0]}


def probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """Held-out predictions of softmax regression on standardised `x` (full-batch L-BFGS, small L2)."""
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    layer = torch.nn.Linear(x.shape[1], len(CLASSES))
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(x[train]), y[train]) + 1e-4 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return layer(x[~train]).argmax(1)


def scored(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Accuracy of the whole class, and of its shape and its colour alone (empty is its own shape and colour)."""
    words = [c.split() for c in CLASSES]
    colour = lambda i: words[i][0]  # noqa: E731
    shape = lambda i: words[i][-1]  # noqa: E731
    pairs = list(zip(predicted.tolist(), truth.tolist()))
    return {"content": sum(p == t for p, t in pairs) / len(pairs),
            "shape": sum(shape(p) == shape(t) for p, t in pairs) / len(pairs),
            "colour": sum(colour(p) == colour(t) for p, t in pairs) / len(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--clip", type=Path, default=None, help="a pretrained CLIP (default: the embedded default's)")
    parser.add_argument("--scenes", type=int, default=1600, help="regions scenes to probe (a quarter held out)")
    parser.add_argument("--random-patch", type=int, nargs="*", default=[],
                        help="also probe random towers of these patch sizes (8: a 8x8 grid at 64 px)")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1],
                        help="the pretrained tower's blocks whose patch tokens are probed (-1: the last, what the default reads)")
    args = parser.parse_args()
    torch.manual_seed(0)
    clip_path = args.clip or args.root / "features" / "pretrained" / "clip" / "clip.pt"
    if not clip_path.is_file():
        raise SystemExit(f"no pretrained CLIP at {clip_path}: run `make train` (or python -m captioner.pretrain_clip) first")
    paths, labels = scenes_and_labels(args.root, args.scenes)
    train = torch.rand(len(paths)) < 0.75
    pretrained = ClipEncoder(str(clip_path))
    v = pretrained.visual
    arch = {"embed_dim": v.output_dim, "image_resolution": v.input_resolution, "vision_layers": len(v.transformer.resblocks),
            "vision_width": v.conv1.out_channels, "vision_patch_size": v.conv1.kernel_size[0], "context_length": 32,
            "vocab_size": 49408, "transformer_width": 64, "transformer_heads": 1, "transformer_layers": 1}
    towers = {("pretrained" if k == -1 else f"pretrained, block {k}"): ClipEncoder({"name": str(clip_path), "layer": k}) for k in args.layers}
    towers["random"] = ClipEncoder(arch, seed=0)
    for patch in args.random_patch:
        towers[f"random, patch {patch}"] = ClipEncoder({**arch, "vision_patch_size": patch}, seed=0)
    table = Table(title=f"corner content (21 classes) from {len(paths)} regions scenes, {int((~train).sum())} held out")
    for column in ("tower", "corner's patch tokens", "  shape / colour alone", "pooled vector", "  shape / colour alone"):
        table.add_column(column, justify="right")
    for name, encoder in towers.items():
        f = features(encoder, paths)
        grid = encoder.resolution // encoder.visual.conv1.kernel_size[0]
        predicted = {"tokens": [], "pooled": []}
        for k, region in enumerate(REGIONS):
            y = labels[:, k]
            tokens = f["patch_tokens"][:, corner_cells(region, grid)].flatten(1)  # (S, cells * E)
            predicted["tokens"].append(probe(tokens, y, train))
            predicted["pooled"].append(probe(f["clip_features"], y, train))
        truth = labels[~train].T.flatten()  # corner by corner, as the predictions are stacked
        cells = []
        for p in predicted.values():
            s = scored(torch.cat(p), truth)
            cells += [f"{100 * s['content']:.1f} %", f"{100 * s['shape']:.1f} % / {100 * s['colour']:.1f} %"]
        table.add_row(name, *cells)
    Console().print(table)


if __name__ == "__main__":
    main()
