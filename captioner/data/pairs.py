"""The datasets of pretraining: image-caption pairs for contrastive CLIP, caption text for GPT-2.

Items:
    ImageCaptionPairs  {"image_id": int, "pixels": (3, R, R) float, "tokens": (C,) CLIP BPE ids}
    CaptionTexts       {"image_id": int, "input_ids": [eos] + caption ids + [eos]}   (datamodule.collate pads)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import clip
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from captioner.data.coco import ImageRecord
from captioner.data.images import load_image


def pairs_hash(records: Sequence[ImageRecord]) -> str:
    """Image ids, file names and sizes and every caption: changes when the training data changes."""
    h = hashlib.sha256()
    for r in records:
        size = r.path.stat().st_size if r.path.exists() else -1
        h.update(f"{r.image_id}\t{r.path.name}\t{size}\t{chr(31).join(r.captions)}\n".encode())
    return h.hexdigest()


class ImageCaptionPairs(Dataset):
    """Every (image, caption) pair of `records`, or only each image's first caption (`first_only`).

    `preload` decodes and preprocesses every image once into memory (a small dataset: the embedded
    default's 8,000 images at 64 px are 390 MB), so an epoch costs no decoding; otherwise each item
    decodes its file."""

    def __init__(self, records: Sequence[ImageRecord], preprocess: Callable, context_length: int,
                 first_only: bool = False, preload: bool = False):
        self.records, self.preprocess = list(records), preprocess
        self.pairs = [(i, k) for i, r in enumerate(self.records) for k in range(1 if first_only else len(r.captions))]
        captions = [self.records[i].captions[k] for i, k in self.pairs]
        self.tokens = clip.tokenize(captions, context_length=context_length, truncate=True)  # (pairs, C)
        self.pixels = None
        if preload:
            self.pixels = torch.stack([self._pixels(r) for r in tqdm(self.records, desc="decode images", unit="img", mininterval=1)])

    def _pixels(self, record: ImageRecord) -> torch.Tensor:
        return self.preprocess(load_image(record.path))  # (3, R, R)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        r, _ = self.pairs[i]
        pixels = self.pixels[r] if self.pixels is not None else self._pixels(self.records[r])
        return {"image_id": self.records[r].image_id, "pixels": pixels, "tokens": self.tokens[i]}


class CaptionTexts(Dataset):
    """Every caption of `records` as GPT-2 tokens, between end-of-text tokens (GPT-2's document separator)."""

    def __init__(self, records: Sequence[ImageRecord], tokenizer, max_tokens: int):
        eos = tokenizer.eos_token_id
        self.items = [
            {"image_id": r.image_id, "input_ids": [eos] + tokenizer.encode(c)[: max_tokens - 2] + [eos]}
            for r in records for c in r.captions
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
