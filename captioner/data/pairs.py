"""The datasets of pretraining: image-caption pairs for contrastive CLIP, caption text for GPT-2.

Items:
    ImageCaptionPairs  {"image_id": int, "pixels": (3, R, R) float, "tokens": (C,) CLIP BPE ids}
    CaptionTexts       {"image_id": int, "input_ids": [eos] + caption ids + [eos] (+ the next caption's ids + [eos] ...)}
                       (datamodule.collate pads)
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
from captioner.models.decoder import caption_ids


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
    """One text per caption of `records`, as GPT-2 tokens between end-of-text tokens.

    With `captions_per_text` n > 1, the text of caption k of an image is captions k, k+1, ... k+n-1 of
    that image (cyclically), each ended by end-of-text: a document about one image, so the language
    model learns to write a caption that agrees with the text before it. That is the in-context reading
    a frozen GPT-2 needs to caption from a prefix, which web-text GPT-2 has and single captions do not teach.
    """

    def __init__(self, records: Sequence[ImageRecord], tokenizer, max_tokens: int, captions_per_text: int = 1):
        if captions_per_text < 1:
            raise ValueError(f"captions_per_text must be >= 1, got {captions_per_text} (pretrain.lm.captions_per_text)")
        eos = tokenizer.eos_token_id
        self.items = []
        for r in records:
            ids = [caption_ids(tokenizer, c)[: max_tokens - 2] + [eos] for c in r.captions]
            for k in range(len(ids)):
                text = [eos] + [t for j in range(min(captions_per_text, len(ids))) for t in ids[(k + j) % len(ids)]]
                self.items.append({"image_id": r.image_id, "input_ids": text})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
