"""The LightningDataModule: COCO-format captions + the CLIP feature store + training-only noise.

A batch is a dict:
    image_id        (B,)       int64
    clip_features   (B, E)     pooled CLIP features
    patch_tokens    (B, T, W)  CLIP patch tokens (when the store keeps them)
    input_ids       (B, S)     caption tokens + end-of-text, padded to the batch's longest caption
    attention_mask  (B, S)     1 on real tokens
    labels          (B, S)     input_ids with -100 on padding (the module adds -100 for the prefix)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from captioner.data import shards
from captioner.data.coco import ImageRecord, load_records
from captioner.data.features import FeatureStore, encoder_digest, identity_hash
from captioner.data.noise import add_noise
from captioner.data.sampler import ResumableLoader, ResumableSampler
from captioner.data.synthetic import write_dataset
from captioner.models.decoder import load_tokenizer
from captioner.models.encoder import ClipEncoder


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


class LengthBucketSampler(ResumableSampler):
    """Batches of captions of similar length, so padding to each batch's longest caption wastes little.

    The epoch's shuffled order is cut into windows of `window` batches; each window is sorted by
    caption length, cut into batches, and those batches are shuffled again. Still a pure function of
    (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, lengths: list[int], seed: int, batch_size: int, window: int):
        super().__init__(len(lengths), seed, batch_size)
        self.lengths, self.window = torch.tensor(lengths), window

    def arrange(self, order: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
        span = self.batch_size * self.window
        out = []
        for s in range(0, len(order), span):
            window = order[s : s + span]
            window = window[torch.argsort(self.lengths[window], stable=True)]
            batches = list(window.split(self.batch_size))
            short = [batches.pop()] if len(batches[-1]) < self.batch_size else []  # stays last: batches keep their bounds
            out += [batches[i] for i in torch.randperm(len(batches), generator=generator)] + short
        return torch.cat(out) if out else order


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


class CaptionDataModule(L.LightningDataModule):
    def __init__(
        self,
        splits: Mapping[str, Mapping[str, str]],  # split -> {format: coco|karpathy|custom, ...} (coco.load_records)
        encoder: str | Mapping,
        tokenizer: str,
        cache_dir: str,
        synthetic: Mapping | None = None,  # set: write the embedded dataset to `root` first
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        max_tokens: int = 40,  # captions are cut to this many tokens, end-of-text included
        noise: Mapping | None = None,  # {variance, rate, normalize}; training batches only
        patch_tokens: bool = True,
        feature_dtype: str = "fp16",
        precision: str = "fp32",
        extract_batch_size: int = 64,
        seed: int = 0,
        bad_images: str = "stop",  # unreadable images: stop listing them, or skip them and report the count
        length_buckets: int = 0,  # k > 0: training batches of similar caption length, sorted in windows of k batches
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.splits = {k: dict(v) for k, v in splits.items()}
        self.noise = dict(noise or {"variance": 0.0})
        self.records: dict[str, list[ImageRecord]] = {}
        self.datasets: dict[str, CaptionDataset] = {}

    def prepare_data(self) -> None:
        if self.hparams.synthetic:
            write_dataset(**self.hparams.synthetic)

    def load_split(self, split: str, **distributed) -> tuple[list[ImageRecord], FeatureStore]:
        """The split's records and feature store, extracted first when needed. `distributed` (rank,
        world_size, barrier, device) shards extraction; under a multi-process Trainer it comes from it."""
        encoder_spec = self.hparams.encoder
        trainer = self.trainer
        if not distributed and trainer is not None and trainer.world_size > 1:
            distributed = dict(rank=trainer.global_rank, world_size=trainer.world_size,
                               barrier=trainer.strategy.barrier, device=trainer.strategy.root_device)
        if self.splits[split].get("format") == "webdataset":  # tar shards: the records come out of the store
            return self._load_shards(split, **distributed)
        records = load_records(self.splits[split])
        # ids and names (a replaced corrupt file resumes the same store) and the encoder: another CLIP,
        # or a rebuilt pretrained one, gets a store of its own
        identity = json.dumps([identity_hash(records), encoder_spec, encoder_digest(encoder_spec)], default=str, sort_keys=True)
        key = hashlib.sha256(identity.encode()).hexdigest()[:12]
        with torch.random.fork_rng(devices=[]):  # extraction's DataLoader draws a seed: a cold cache must not shift the run
            store = FeatureStore.open_or_extract(
                Path(self.hparams.cache_dir) / f"{split}-{key}",
                records,
                encoder_factory=partial(ClipEncoder, encoder_spec, self.hparams.precision),
                encoder_spec=encoder_spec,
                split=split,
                precision=self.hparams.precision,
                dtype=self.hparams.feature_dtype,
                tokens=self.hparams.patch_tokens,
                batch_size=self.hparams.extract_batch_size,
                num_workers=self.hparams.num_workers,
                bad_images=self.hparams.bad_images,
                **distributed,
            )
        kept = [r for r in records if r.image_id in store.row]  # skipped unreadable images have no features
        return kept, store

    def _load_shards(self, split: str, **distributed) -> tuple[list[ImageRecord], FeatureStore]:
        spec, hp = self.splits[split], self.hparams
        urls = shards.expand(spec["shards"])
        identity = json.dumps([urls, hp.encoder, encoder_digest(hp.encoder)], default=str, sort_keys=True)  # as load_split's key
        key = hashlib.sha256(identity.encode()).hexdigest()[:12]
        with torch.random.fork_rng(devices=[]):
            return shards.open_or_extract(
                Path(hp.cache_dir) / f"{split}-{key}", urls, partial(ClipEncoder, hp.encoder, hp.precision), hp.encoder, split,
                precision=hp.precision, dtype=hp.feature_dtype, tokens=hp.patch_tokens, batch_size=hp.extract_batch_size,
                num_workers=hp.num_workers, bad_images=hp.bad_images, **distributed,
            )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        eos, limit = self.tokenizer.eos_token_id, self.hparams.max_tokens
        for split in self.splits:
            records, store = self.load_split(split)
            tokens = [[self.tokenizer.encode(c)[: limit - 1] + [eos] for c in r.captions] for r in records]
            if split == "train":
                pairs = [(i, k) for i, r in enumerate(records) for k in range(len(r.captions))]
            else:  # one item per image: its first caption gives the loss, all of them the scores
                pairs = [(i, 0) for i in range(len(records))]
            self.records[split] = records
            self.datasets[split] = CaptionDataset(store, records, tokens, pairs)

    def references(self, split: str) -> dict[int, list[str]]:
        return {r.image_id: list(r.captions) for r in self.records[split]}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        batch_size = self.hparams.batch_size if shuffle else self.hparams.eval_batch_size
        # training resumes mid-epoch at the same batch (data/sampler.py); evaluation reads in order
        dataset, sampler = self.datasets[split], None
        if shuffle and self.hparams.length_buckets:
            lengths = [len(dataset.tokens[r][k]) for r, k in dataset.pairs]
            sampler = LengthBucketSampler(lengths, self.hparams.seed, batch_size, self.hparams.length_buckets)
        elif shuffle:
            sampler = ResumableSampler(len(dataset), self.hparams.seed, batch_size)
        return (ResumableLoader if shuffle else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is None or not self.trainer.training:
            return batch  # validation, test and prediction see clean features
        if isinstance(sampler := getattr(getattr(self.trainer, "train_dataloader", None), "sampler", None), ResumableSampler):
            sampler.consumed += 1  # the resume position: batches the model received, not prefetched ones
        noisy = dict(batch)
        for key in ("clip_features", "patch_tokens"):
            if key in batch:
                noisy[key] = add_noise(batch[key], **self.noise)
        return noisy
