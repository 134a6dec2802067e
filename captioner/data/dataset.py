"""Caption pairs over a feature store: records tokenised once, items as dicts, batches padded.

An item is {image_id, clip_features[, patch_tokens], input_ids (list of token ids)}; `collate` makes
the batch the DataModule documents (input_ids, attention_mask, labels with -100 on padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from captioner.data.coco import ImageRecord
from captioner.data.features import FeatureStore
from captioner.models.decoder import caption_ids


def tokenize(records: Sequence[ImageRecord], tokenizer, max_tokens: int) -> list[list[list[int]]]:
    """tokens[r][k]: caption k of record r without the tokenizer's special tokens (the image prefix
    stands where a BOS would), cut to `max_tokens` with end-of-sequence kept last."""
    eos = tokenizer.eos_token_id
    return [[caption_ids(tokenizer, c)[: max_tokens - 1] + [eos] for c in r.captions] for r in records]


def pairs_for(records: Sequence[ImageRecord], every_caption: bool) -> list[tuple[int, int]]:
    """(record, caption) pairs: every caption of every image (what training shuffles), or one item per
    image whose first caption gives the loss and all of whose captions give the scores (evaluation)."""
    if every_caption:
        return [(i, k) for i, r in enumerate(records) for k in range(len(r.captions))]
    return [(i, 0) for i, r in enumerate(records) if not r.mirrored]  # a training image's mirrored twin is not captioned


class CaptionDataset(Dataset):
    """(image, caption) pairs over a feature store; `pairs` holds (record index, caption index)."""

    def __init__(self, store: FeatureStore, records: list[ImageRecord], tokens: list[list[list[int]]], pairs: list[tuple[int, int]]):
        self.store, self.records, self.tokens, self.pairs = store, records, tokens, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        r, k = self.pairs[i]
        image_id = self.records[r].image_id
        return {"image_id": image_id, **self.store.features(image_id), "input_ids": self.tokens[r][k]}

    def per_image(self) -> CaptionDataset:
        """The same split with one item per image: what captioning and scoring a split reads."""
        return type(self)(self.store, self.records, self.tokens, pairs_for(self.records, every_caption=False))

    def lengths(self) -> list[int]:
        """Token count of each item, in item order (LengthBucketSampler)."""
        return [len(self.tokens[r][k]) for r, k in self.pairs]


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(it["input_ids"]) for it in items)  # pad to this batch's longest caption only
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for i, it in enumerate(items):
        input_ids[i, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        mask[i, : len(it["input_ids"])] = 1
    batch = {
        "image_id": torch.tensor([it["image_id"] for it in items]),
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": input_ids.masked_fill(mask == 0, -100),
    }
    for key in ("clip_features", "patch_tokens"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    return batch
