"""Text-only training (CapDec): learn the mapper on CLIP *text* embeddings of the captions, caption images.

CLIP puts a caption and its image near each other but not on the same point; training on the
caption's own embedding, L2-normalised, plus Gaussian noise (`data.noise`, variance 0.016, every
dimension) teaches the mapper the neighbourhood rather than the point, so at test time the image's
embedding lands inside it. Only the training split changes: validation and test read image
features, so `val/loss` and the scores measure captions of images.

Each training caption is embedded once by the frozen CLIP text tower and kept in a store,
`train-text-<hash of captions and encoder>/` in `data.cache_dir`:
    manifest.json        encoder, precision, caption count and hash (written last: its presence means complete)
    text_features.npy    (C, E) one row per caption, in annotation order (record by record)
Only mappers that read the pooled vector (`input_key = "clip_features"`: `mlp`, `transformer`) can train
this way: text has no patch tokens.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from captioner.data.coco import ImageRecord, load_records
from captioner.data.datamodule import CaptionDataModule, CaptionDataset
from captioner.data.features import encoder_digest
from captioner.data.manifest import MANIFEST, check_manifest, plain, read_manifest, sole_writer, write_json
from captioner.models.registry import MAPPERS
from captioner.models.towers import build_encoder

TEXT_STORE_VERSION = 1


def caption_hash(records: list[ImageRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        for c in r.captions:
            h.update(f"{r.image_id}\t{c}\n".encode())
    return h.hexdigest()


class TextFeatureStore:
    """CLIP text embeddings of every caption of a split, memory-mapped; row of (record r, caption k)."""

    skipped: frozenset[int] = frozenset()  # a caption is never unreadable (FeatureStore's field, for the extract table)

    def __init__(self, directory: str | Path, records: list[ImageRecord]):
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / MANIFEST).read_text())
        self.features = np.load(self.directory / "text_features.npy", mmap_mode="r")
        self.offsets = np.cumsum([0] + [len(r.captions) for r in records])[:-1].tolist()

    def caption_features(self, r: int, k: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[self.offsets[r] + k], dtype=np.float32))


def open_or_encode(directory: str | Path, records: list[ImageRecord], encoder_factory, encoder_spec,
                   precision: str, dtype: str = "fp16", batch_size: int = 256, device=None) -> TextFeatureStore:
    """The caption store at `directory`, encoded first when absent; one made with other settings is refused."""
    directory = Path(directory)
    with sole_writer(directory):
        captions = [c for r in records for c in r.captions]
        wanted = {
            "version": TEXT_STORE_VERSION,
            "kind": "clip text embeddings of captions",
            "encoder": plain(encoder_spec),
            "encoder_sha256": encoder_digest(encoder_spec),
            "precision": precision,
            "normalisation": "none (raw CLIP outputs; noise and the model normalise)",
            "dtype": dtype,
            "count": len(captions),
            "caption_hash": caption_hash(records),
        }
        if read_manifest(directory) is not None:
            check_manifest(directory, wanted, "text feature store", "Delete the directory to re-encode, or point data.cache_dir elsewhere.")
            return TextFeatureStore(directory, records)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        encoder = encoder_factory().to(device)
        directory.mkdir(parents=True, exist_ok=True)
        np_dtype = np.float16 if dtype == "fp16" else np.float32
        array = np.lib.format.open_memmap(directory / "text_features.npy", mode="w+", dtype=np_dtype,
                                          shape=(len(captions), encoder.embed_dim))
        for start in tqdm(range(0, len(captions), batch_size), desc="encode captions", unit="batch"):
            batch = captions[start : start + batch_size]
            array[start : start + len(batch)] = encoder.encode_text(batch).cpu().numpy().astype(np_dtype)
        array.flush()
        del array
        write_json(directory / MANIFEST, wanted)  # last: its presence means the store is complete
        return TextFeatureStore(directory, records)


class TextCaptionDataset(CaptionDataset):
    """(caption, its own CLIP text embedding) pairs: `clip_features` is the caption's, not the image's."""

    def __getitem__(self, i: int) -> dict:
        r, k = self.pairs[i]
        return {"image_id": self.records[r].image_id, "clip_features": self.store.caption_features(r, k),
                "input_ids": self.tokens[r][k]}


class TextCaptionDataModule(CaptionDataModule):
    """`CaptionDataModule` whose training split is captions alone (CapDec); val and test are images."""

    def load_split(self, split: str, **distributed):
        if split != "train":
            return super().load_split(split, **distributed)
        records = load_records(self.splits[split])  # captions only: no training image is read
        spec = self.hparams.encoder
        trainer = self.trainer
        if not distributed and trainer is not None and trainer.world_size > 1:
            distributed = dict(rank=trainer.global_rank, barrier=trainer.strategy.barrier, device=trainer.strategy.root_device)
        encode = partial(
            open_or_encode,
            Path(self.hparams.cache_dir) / f"train-text-{self._store_key(records)}",
            records,
            encoder_factory=partial(build_encoder, spec, self.hparams.precision),
            encoder_spec=spec,
            precision=self.hparams.precision,
            dtype=self.hparams.feature_dtype,
            batch_size=self.hparams.extract_batch_size,  # captions per CLIP text-tower call
            device=distributed.get("device"),
        )
        if distributed.get("rank", 0) == 0:  # one process encodes, the others wait and open its store
            store = encode()
            if "barrier" in distributed:
                distributed["barrier"]()
        else:
            distributed["barrier"]()
            store = encode()
        return records, store

    def _store_key(self, records: list[ImageRecord]) -> str:
        """Captions and the encoding settings: another CLIP gets its own store, not a stale-store error."""
        encoder = self.hparams.encoder
        what = [caption_hash(records), plain(encoder), encoder_digest(encoder), self.hparams.precision, self.hparams.feature_dtype]
        return hashlib.sha256(json.dumps(what, default=str, sort_keys=True).encode()).hexdigest()[:12]

    def setup(self, stage: str | None = None) -> None:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        mapper = getattr(module, "mapper", None)
        if mapper is not None and mapper.input_key != "clip_features":
            pooled = " or ".join(f"model/mapper={name}" for name, cls in sorted(MAPPERS.items()) if cls.input_key == "clip_features")
            raise ValueError(
                f"text-only training gives CLIP text embeddings (clip_features), but the {getattr(mapper, 'name', type(mapper).__name__)} "
                f"mapper reads {mapper.input_key}: use {pooled}"
            )
        fresh = not self.datasets
        super().setup(stage)
        if fresh:
            d = self.datasets["train"]
            self.datasets["train"] = TextCaptionDataset(d.store, d.records, d.tokens, d.pairs)

