"""The bridge comparison's table from the runs of `python -m captioner.train -m sweep=bridges`.

    python bench/bridges.py outputs/train/multiruns/<sweep>            # every job of one or more sweeps

For each job: its bridge, the tower's patch-token layer and pretraining loss, test scene accuracy overall, on
rows of three and on the corner-bound `regions` layout (where the data has it), fair CIDEr (% of the humans'),
trainable parameters, prefix length, the run's wall time, and the decode latency per image of its best
checkpoint (greedy, one image at a time, `--images` test images, the median of `--runs` passes, one
thread: the same work for every bridge, measured here one after another in this process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.api import Captioner  # noqa: E402
from captioner.checkpoint import load_module  # noqa: E402


def best_checkpoint(run: Path) -> Path:
    """The checkpoint the run kept for its best validation CIDEr (`epochNN-ciderX.ckpt`), else last.ckpt."""
    best = sorted(run.glob("checkpoints/epoch*-cider*.ckpt"), key=lambda p: float(p.stem.split("cider")[1]))
    return best[-1] if best else run / "checkpoints" / "last.ckpt"


def latency(captioner: Captioner, images: list[Path], runs: int) -> float:
    """Median seconds per image over `runs` passes of greedy captioning, one image at a time."""
    captioner.caption(str(images[0]), strategy="greedy")  # warm-up
    passes = []
    for _ in range(runs):
        start = time.perf_counter()
        for image in images:
            captioner.caption(str(image), strategy="greedy")
        passes.append((time.perf_counter() - start) / len(images))
    return statistics.median(passes)


def row(run: Path, images: int, runs: int) -> dict:
    config = yaml.safe_load((run / "config.yaml").read_text())  # the run's resolved settings (captioner/train.py)
    scores = json.loads((run / "scores.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    ckpt = best_checkpoint(run)
    model = load_module(ckpt).model  # as trained: the served copy is prepacked, its weights in another layout
    captioner = Captioner.from_pretrained(ckpt)  # what a user captions with
    test = Path(config["data"]["splits"]["test"]["images"])
    files = sorted(p for p in test.iterdir() if p.suffix == ".png")[:images]
    scene = scores["scene"]
    encoder = config["model"]["encoder"]
    regions = scene["by_layout"].get("regions")
    return {
        "bridge": config["model"]["mapper"]["name"],
        "layer": encoder.get("layer", -1) if isinstance(encoder, dict) else -1,
        "tower loss": config["pretrain"]["clip"]["loss"] if config.get("pretrain") else "-",
        "scene accuracy": f"{100 * scene['accuracy']:.1f} %",
        "rows of three": f"{100 * scene['by_layout']['triple']:.1f} %",
        "regions": "-" if regions is None else f"{100 * regions:.1f} %",
        "fair CIDEr, % of human": f"{scores['fair']['percent_of_human']['CIDEr']:.1f}",
        "trainable parameters": f"{model.trainable_parameters()['all'][0]:,}",
        "mapper parameters": f"{sum(p.numel() for p in model.mapper.parameters()):,}",
        "prefix length": model.prefix_length,
        "run wall time (s)": f"{metrics['time/wall_s']:.0f}",
        "decode ms / image": f"{1000 * latency(captioner, files, runs):.1f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="multirun folders of sweep=bridges")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = sorted(p for sweep in args.sweeps for p in sweep.iterdir() if (p / "scores.json").is_file())
    if not runs:
        sys.exit(f"error: no finished job (a folder with scores.json) under {', '.join(map(str, args.sweeps))}")
    rows = [row(run, args.images, args.runs) for run in runs]
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in header) + " |")


if __name__ == "__main__":
    main()
