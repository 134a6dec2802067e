"""The LightningDataModule: wiring only. Records come from coco.py, features from the store
(features.py, written by extraction.py), tokens and batches from dataset.py, the training order
from sampler.py, and noise (noise.py) touches training batches only.

A batch is a dict:
    image_id        (B,)       int64
    clip_features   (B, E)     pooled CLIP features
    patch_tokens    (B, T, W)  CLIP patch tokens (when the store keeps them)
    input_ids       (B, S)     caption tokens + end-of-text, padded to the batch's longest caption
    attention_mask  (B, S)     1 on real tokens
    labels          (B, S)     input_ids with -100 on padding (the module adds -100 for the prefix)
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from captioner.data import shards
from captioner.data.coco import ImageRecord, load_records
from captioner.data.dataset import CaptionDataset, collate, pairs_for, tokenize
from captioner.data.extraction import open_or_extract
from captioner.data.features import FeatureStore, identity_hash, store_key
from captioner.data.mirror import SIDES, SideWords, mirror_records, twin_pairs
from captioner.data.noise import add_noise
from captioner.data.sampler import ResumableLoader, training_sampler
from captioner.data.synthetic import write_dataset
from captioner.models.decoder import load_tokenizer
from captioner.models.towers import build_encoder


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
        pin_memory: bool = False,  # page-locked batches, which Lightning then copies to a GPU with non_blocking=True
        mirror: bool = False,  # training captions that name a side get a mirrored twin (data/mirror.py)
        mirror_swap: Mapping | None = None,  # the words a mirror swaps; None: {left: right, right: left}
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.splits = {k: dict(v) for k, v in splits.items()}
        self.noise = dict(noise or {"variance": 0.0})
        # refuses a swap that does not map back, before anything is extracted
        self.side_words = SideWords(mirror_swap or SIDES) if mirror else None
        self.twins: list[int] | None = None
        self.records: dict[str, list[ImageRecord]] = {}
        self.datasets: dict[str, CaptionDataset] = {}

    def prepare_data(self) -> None:
        if self.hparams.synthetic and self._reads_synthetic():
            write_dataset(**self.hparams.synthetic)

    def _reads_synthetic(self) -> bool:
        """Whether any split reads a file under the embedded dataset's root: a world of one's own given through
        `data.splits.*` does not need the 8,000 embedded scenes written."""
        root = Path(self.hparams.synthetic["root"]).resolve()
        paths = [Path(v).resolve() for split in self.splits.values() for v in split.values() if isinstance(v, str)]
        return any(path.is_relative_to(root) for path in paths)

    def load_split(self, split: str, **distributed) -> tuple[list[ImageRecord], FeatureStore]:
        """The split's records and feature store, extracted first when needed. `distributed` (rank,
        world_size, barrier, device) shards extraction; under a multi-process Trainer it comes from it.
        With `mirror`, the training split's records end with their mirrored twins, in the same store."""
        encoder_spec = self.hparams.encoder
        trainer = self.trainer
        if not distributed and trainer is not None and trainer.world_size > 1:
            distributed = dict(rank=trainer.global_rank, world_size=trainer.world_size,
                               barrier=trainer.strategy.barrier, device=trainer.strategy.root_device)
        if self.splits[split].get("format") == "webdataset":  # tar shards: the records come out of the store
            if split == "train" and self.side_words is not None:
                raise ValueError("data.mirror=true mirrors image files, and this training split is webdataset shards: "
                                 "set data.mirror=false")
            return self._load_shards(split, **distributed)
        records = load_records(self.splits[split])
        if split == "train" and self.side_words is not None:
            records = records + mirror_records(records, self.side_words)
        key = store_key(identity_hash(records), encoder_spec)
        with torch.random.fork_rng(devices=[]):  # extraction's DataLoader draws a seed: a cold cache must not shift the run
            store = open_or_extract(
                Path(self.hparams.cache_dir) / f"{split}-{key}",
                records,
                encoder_factory=partial(build_encoder, encoder_spec, self.hparams.precision),
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
        key = store_key("\n".join(urls), hp.encoder)
        with torch.random.fork_rng(devices=[]):
            return shards.open_or_extract(
                Path(hp.cache_dir) / f"{split}-{key}", urls, partial(build_encoder, hp.encoder, hp.precision), hp.encoder, split,
                precision=hp.precision, dtype=hp.feature_dtype, tokens=hp.patch_tokens, batch_size=hp.extract_batch_size,
                num_workers=hp.num_workers, bad_images=hp.bad_images, **distributed,
            )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        for split in self.splits:
            records, store = self.load_split(split)
            tokens = tokenize(records, self.tokenizer, self.hparams.max_tokens)
            pairs = pairs_for(records, every_caption=split == "train")
            self.records[split] = [r for r in records if not r.mirrored]
            self.datasets[split] = CaptionDataset(store, records, tokens, pairs)
            if split == "train" and any(r.mirrored for r in records):  # text-only training reads no image to mirror
                self.twins = twin_pairs(records, pairs, self.side_words)

    def references(self, split: str) -> dict[int, list[str]]:
        return {r.image_id: list(r.captions) for r in self.records[split]}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        # training resumes mid-epoch at the same batch (data/sampler.py); evaluation reads in order
        dataset = self.datasets[split] if shuffle else self.datasets[split].per_image()
        batch_size = self.hparams.batch_size if shuffle else self.hparams.eval_batch_size
        sampler = training_sampler(dataset.lengths(), self.hparams.seed, batch_size, self.hparams.length_buckets,
                                   self.twins) if shuffle else None
        return (ResumableLoader if shuffle else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id),
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=self.hparams.get("pin_memory", False),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every image of `split` once, in order (captioning a split, the training split included)."""
        return self._loader(split, shuffle=False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is None or not self.trainer.training:
            return batch  # validation, test and prediction see clean features
        noisy = dict(batch)
        for key in ("clip_features", "patch_tokens"):
            if key in batch:
                noisy[key] = add_noise(batch[key], **self.noise)
        return noisy
