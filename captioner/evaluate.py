"""Captioning a split and scoring it with the official metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from captioner.generate import Decoding
from captioner.metrics import METRICS, score_with_human, table


@torch.no_grad()
def caption_split(module, datamodule, split: str, decoding: Decoding) -> dict[int, str]:
    """{image_id: caption} for every image of `split` (features from the datamodule's store)."""
    module.eval()
    loader = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}[split]()
    captions: dict[int, str] = {}
    for batch in tqdm(loader, desc=f"caption {split}", unit="batch"):
        batch = {k: v.to(module.device) for k, v in batch.items()}
        captions.update(zip(batch["image_id"].tolist(), module.caption_features(batch, decoding)))
    return captions


def write_results(run_dir: str | Path, split: str, captions: dict[int, str], scores: dict) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = [{"image_id": i, "caption": c} for i, c in sorted(captions.items())]  # COCO results format
    (run_dir / f"captions_{split}.json").write_text(json.dumps(results, indent=1))
    (run_dir / "scores.json").write_text(json.dumps(scores, indent=2))


def score_split(references: dict[int, list[str]], captions: dict[int, str], meteor: bool = True) -> dict:
    scores = score_with_human(references, captions, meteor=meteor)
    order = [m for m in METRICS if m in scores["model"]]
    return {part: {m: values[m] for m in order} for part, values in scores.items()}


def print_scores(scores: dict, title: str) -> None:
    from rich.console import Console

    Console().print(table(scores, title=title))
