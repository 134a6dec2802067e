"""Feature extraction throughput on real COCO photos: our store vs ClipCap's per-caption encoding.

    .venv/bin/python bench/extract.py [--data ../shared/data/coco_mini] [--baseline-images 16]

Both use full-size ViT-B/32 (random weights: same FLOPs as the pretrained model) on CPU, in this
process, on the same JPEGs. Ours: DataLoader workers decode while CLIP encodes batches, one encode
per image, written to the memory-mapped store. ClipCap (`parse_coco.py`): for every caption, open
the image, preprocess it and encode it alone, so each image is encoded once per caption (5x on COCO).
The baseline is timed on a subset and reported per image, half before and half after ours, so a
change in load on a shared machine affects both. CPU seconds per image (this process and its
DataLoader workers) are printed too: unlike wall time they do not depend on other processes' load.

`--siglip N` adds our extraction of N images with open_clip's ViT-B-16-SigLIP (random weights at the
published size: 224 px, 196 patch tokens of width 768, no class token; `--siglip 0` leaves it out),
with its share of the machine's peak like the other rows.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import roofline  # bench/, beside this file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's captioner, not an installed one
from captioner.data.coco import load_karpathy  # noqa: E402
from captioner.data.extraction import open_or_extract  # noqa: E402
from captioner.data.images import load_image  # noqa: E402
from captioner.models.encoder import ClipEncoder  # noqa: E402
from captioner.models.towers import build_encoder  # noqa: E402

SIGLIP = {"source": "open_clip", "name": "ViT-B-16-SigLIP", "random": True}
VIT_B_32 = dict(  # clip.model.CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)
    embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
    context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12,
)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def ours(records, encoder: ClipEncoder, batch_size: int, workers: int, spec=VIT_B_32) -> float:
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        store = open_or_extract(
            Path(directory) / "store", records, lambda: encoder, spec, "bench",
            batch_size=batch_size, num_workers=workers, dtype="fp16", tokens=True,
        )
        seconds = time.perf_counter() - start
        assert len(store) == len(records)
    return seconds


def clipcap(records, encoder: ClipEncoder) -> tuple[float, int]:
    """One forward per (image, caption) pair, batch of one, image re-read each time."""
    forwards = 0
    start = time.perf_counter()
    for record in records:
        for _caption in record.captions:
            pixels = encoder.preprocess(load_image(record.path)).unsqueeze(0)
            encoder(pixels)
            forwards += 1
    return time.perf_counter() - start, forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini")
    parser.add_argument("--baseline-images", type=int, default=16, help="images the per-caption baseline encodes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-waiting on a shared machine)")
    parser.add_argument("--siglip", type=int, default=32, help="images open_clip's ViT-B-16-SigLIP extracts (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split_file = args.data / "annotations" / "dataset_coco_mini_karpathy_format.json"
    records = load_karpathy(split_file, args.data / "images", ["train", "val", "test"])
    encoder = ClipEncoder(VIT_B_32)
    captions = sum(len(r.captions) for r in records)
    print(f"{len(records)} COCO images, {captions} captions; ViT-B/32 on CPU, {torch.get_num_threads()} torch thread(s)")

    encoder(torch.zeros(1, 3, 224, 224))  # warm-up: first-call allocations out of both timings
    subset = records[: args.baseline_images]
    half = len(subset) // 2
    cpu = cpu_seconds()
    base_s, forwards = clipcap(subset[:half], encoder)
    base_cpu = cpu_seconds() - cpu
    cpu = cpu_seconds()
    ours_s = ours(records, encoder, args.batch_size, args.workers)
    ours_cpu = cpu_seconds() - cpu
    cpu = cpu_seconds()
    more_s, more_forwards = clipcap(subset[half:], encoder)
    base_s, forwards, base_cpu = base_s + more_s, forwards + more_forwards, base_cpu + cpu_seconds() - cpu

    ours_rate, base_rate = len(records) / ours_s, len(subset) / base_s
    peak = roofline.probe()
    # the work of one image: a batch-1 forward (ClipCap's) and one image of a batch (ours) cost the same FLOPs
    per_batch = roofline.measure(lambda: encoder(torch.zeros(args.batch_size, 3, 224, 224))).scaled(1 / args.batch_size)
    per_single = roofline.measure(lambda: encoder(torch.zeros(1, 3, 224, 224)))
    table = Table(title="feature extraction, images per second (higher is better)")
    for column in ("method", "images", "CLIP forwards", "seconds", "images/s", "vs ClipCap", "CPU s/image", *roofline.COLUMNS):
        table.add_column(column, justify="left" if column == "method" else "right")
    table.add_row("ClipCap: per caption, batch 1", str(len(subset)), str(forwards), f"{base_s:.1f}", f"{base_rate:.2f}", "1.0x",
                  f"{base_cpu / len(subset):.2f}", *per_single.scaled(forwards / len(subset)).cells(1 / base_rate, peak))
    table.add_row(f"ours: per image, batch {args.batch_size}, {args.workers} workers", str(len(records)), str(len(records)),
                  f"{ours_s:.1f}", f"{ours_rate:.2f}", f"{ours_rate / base_rate:.1f}x",
                  f"{ours_cpu / len(records):.2f}", *per_batch.cells(1 / ours_rate, peak))
    if args.siglip:
        tower = build_encoder(SIGLIP)
        few = records[: args.siglip]
        tower(torch.zeros(1, 3, tower.resolution, tower.resolution))  # warm-up, as above
        cpu = cpu_seconds()
        siglip_s = ours(few, tower, args.batch_size, args.workers, SIGLIP)
        siglip_cpu = cpu_seconds() - cpu
        size = tower.resolution
        work = roofline.measure(lambda: tower(torch.zeros(args.batch_size, 3, size, size))).scaled(1 / args.batch_size)
        table.add_row(f"ours, open_clip ViT-B-16-SigLIP ({tower.num_tokens} tokens)", str(len(few)), str(len(few)),
                      f"{siglip_s:.1f}", f"{len(few) / siglip_s:.2f}", "", f"{siglip_cpu / len(few):.2f}",
                      *work.cells(siglip_s / len(few), peak))
    console = Console(width=150)
    console.print(peak.line())
    console.print(table)
    print(f"target >= 5x: {'met' if ours_rate / base_rate >= 5 else 'NOT met'}")


if __name__ == "__main__":
    main()
