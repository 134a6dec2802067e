"""Retrieval-augmented captioning (SmallCap, Ramos et al. 2023) on top of the prefix model.

A datastore holds captions and their CLIP text embeddings (L2-normalised). For an image, the k
captions nearest to its CLIP image embedding (cosine, exact `torch.topk`) are written into a prompt

    "Similar images show {c1}. {c2}. ... {ck}. This image shows"

which GPT-2 reads after the mapper's prefix; the caption follows it. During training an image's own
captions are never retrieved (the model would learn to copy them). The datastore is a directory
(`Datastore.build` / `Datastore.open`): swap it at inference (`Captioner.from_pretrained(path,
datastore=DIR)`, `python -m captioner.caption --datastore DIR`, `python -m captioner.serve datastore=DIR`)
to caption another domain without retraining. Retrieval needs a CLIP whose image and text towers were
trained together; with a random CLIP the nearest captions are noise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from captioner.generate import Decoding
from captioner.models.decoder import caption_ids
from captioner.module import CaptionModule

HEAD, TAIL = "Similar images show", "This image shows"


def prompt(captions: Sequence[str]) -> str:
    """SmallCap's prompt around the retrieved captions."""
    body = " ".join(c.strip().rstrip(".") + "." for c in captions)
    return f"{HEAD} {body} {TAIL}"


class Datastore:
    """Captions, the image each came from (-1: none) and their unit-length CLIP text embeddings (M, E)."""

    def __init__(self, captions: list[str], image_ids: list[int], embeddings: torch.Tensor, path: Path | None = None):
        if not (len(captions) == len(image_ids) == len(embeddings)):
            raise ValueError(f"a datastore needs one image id and embedding per caption: {len(captions)}, {len(image_ids)}, {len(embeddings)}")
        self.captions, self.image_ids, self.path = captions, torch.tensor(image_ids), path
        self.embeddings = F.normalize(embeddings.float(), dim=-1)

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    def build(cls, path: str | Path, captions: Sequence[str], image_ids: Sequence[int], encoder, batch_size: int = 256) -> "Datastore":
        """Embed `captions` with `encoder`'s text tower (a `ClipEncoder`) and write the datastore to `path`."""
        from tqdm import tqdm

        chunks = [encoder.encode_text(list(captions[s : s + batch_size]))
                  for s in tqdm(range(0, len(captions), batch_size), desc="datastore", unit="batch", leave=False)]
        store = cls(list(captions), list(map(int, image_ids)), torch.cat(chunks), Path(path))
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "embeddings.npy", store.embeddings.numpy())
        (path / "captions.json").write_text(json.dumps({"captions": store.captions, "image_ids": store.image_ids.tolist()}))
        (path / "manifest.json").write_text(json.dumps({"count": len(store), "embed_dim": store.embeddings.shape[1]}))
        return store

    @classmethod
    def open(cls, path: str | Path) -> "Datastore":
        path = Path(path).expanduser()
        if not (path / "embeddings.npy").is_file() or not (path / "captions.json").is_file():
            raise FileNotFoundError(f"{path} is not a datastore: it needs embeddings.npy and captions.json (captioner.retrieval.Datastore.build)")
        saved = json.loads((path / "captions.json").read_text())
        return cls(saved["captions"], saved["image_ids"], torch.from_numpy(np.load(path / "embeddings.npy")), path)

    @torch.no_grad()
    def search(self, images: torch.Tensor, k: int, exclude: Sequence[int] | None = None) -> list[list[str]]:
        """The k captions nearest to each image embedding (B, E); `exclude[b]`: image b's id, whose own
        captions are skipped (training)."""
        if images.shape[-1] != self.embeddings.shape[1]:
            raise ValueError(f"image embeddings have {images.shape[-1]} dimensions, the datastore {self.embeddings.shape[1]}: "
                             "it was built with another CLIP")
        sims = F.normalize(images.float(), dim=-1) @ self.embeddings.T.to(images.device)  # (B, M)
        if exclude is not None:
            own = self.image_ids.to(images.device)[None, :] == torch.as_tensor(list(exclude), device=images.device)[:, None]
            sims = sims.masked_fill(own, -float("inf"))
        top = sims.topk(min(k, len(self)), dim=1).indices.tolist()  # (B, k), nearest first
        return [[self.captions[j] for j in row] for row in top]


class RetrievalModule(CaptionModule):
    """CaptionModule whose GPT-2 reads prefix + SmallCap prompt + caption. `retrieval`: {k, datastore}."""

    def __init__(self, retrieval: Mapping | None = None, **caption_module):
        super().__init__(**caption_module)
        retrieval = dict(retrieval or {})
        if not retrieval.get("datastore"):
            raise ValueError("retrieval needs a datastore: set model.retrieval.datastore=DIR (experiment=retrieval builds one from the training captions)")
        self.k = int(retrieval.get("k", 4))
        self.save_hyperparameters({**self.hparams, "retrieval": {"k": self.k, "datastore": str(retrieval["datastore"])}})
        self._datastore: Datastore | None = None

    @property
    def datastore(self) -> Datastore:
        if self._datastore is None:  # opened on first use: a checkpoint loads without its datastore present
            self._datastore = Datastore.open(self.hparams.retrieval["datastore"])
        return self._datastore

    @datastore.setter
    def datastore(self, store: Datastore) -> None:
        self._datastore = store

    def on_fit_start(self) -> None:
        """The training captions become the datastore when the configured one does not exist yet."""
        super().on_fit_start()
        path = Path(self.hparams.retrieval["datastore"])
        if self._datastore is None and not (path / "embeddings.npy").is_file():
            datamodule = self.trainer.datamodule
            datamodule.setup("fit")
            pairs = [(c, r.image_id) for r in datamodule.records["train"] for c in r.captions]
            self._datastore = Datastore.build(path, [c for c, _ in pairs], [i for _, i in pairs], self.encoder)

    def retrieve(self, batch: Mapping[str, torch.Tensor], exclude_own: bool = False) -> list[list[str]]:
        query = batch["clip_features"] if "clip_features" in batch else self.encoder(batch["pixels"])["clip_features"]
        return self.datastore.search(query, self.k, batch["image_id"].tolist() if exclude_own else None)

    def prompt_ids(self, retrieved: list[list[str]]) -> list[list[int]]:
        # a leading space: a byte-level BPE's word boundary, so the caption's first word reads as in training
        return [caption_ids(self.tokenizer, " " + prompt(r)) for r in retrieved]

    def forward(self, batch: Mapping[str, torch.Tensor]):
        return self.model(batch, prompts=self.prompt_ids(self.retrieve(batch, exclude_own=self.training)))

    @torch.no_grad()
    def describe_features(self, batch: Mapping[str, torch.Tensor], decoding: Decoding | None = None) -> tuple[list[str], list[list[str]]]:
        """(captions, retrieved captions) for a batch."""
        retrieved = self.retrieve(batch)
        return self.model.caption(batch, decoding or self.val_decoding, prompts=self.prompt_ids(retrieved)), retrieved

    def caption_features(self, batch: Mapping[str, torch.Tensor], decoding: Decoding | None = None) -> list[str]:
        return self.describe_features(batch, decoding)[0]
