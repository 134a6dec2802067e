"""Language-model pretraining of a decoder (GPT-2, or a Llama-style or any `model_type` architecture)
on caption text alone, the miniature of a published LM's pretraining.

ClipCap's frozen-GPT-2 variant assumes a decoder that already writes the language; a randomly
initialised tiny decoder does not. Trained here on the training captions (no image), it is saved with
`save_pretrained`, so `model.decoder=DIR` loads it like the published `gpt2` or SmolLM2.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from transformers import get_cosine_schedule_with_warmup

from captioner.models.decoder import load_decoder, load_tokenizer


class CaptionLM(L.LightningModule):
    """Next-token loss over `<|endoftext|> caption <|endoftext|>`; batches are {input_ids, attention_mask, labels}."""

    def __init__(
        self,
        arch: Mapping,  # GPT2Config fields (or {arch: gpt2, ...}), or {model_type: llama, ...}; the vocabulary comes from the tokenizer
        tokenizer: str,  # a tokenizer directory (models/decoder.py::load_tokenizer)
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        self.gpt2 = load_decoder(dict(arch), self.tokenizer, seed=seed)

    def training_step(self, batch, batch_idx):
        loss = self.gpt2(**batch).loss
        self.log("pretrain/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.gpt2(**batch).loss, prog_bar=True, batch_size=len(batch["input_ids"]))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.gpt2.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.max_steps
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(self.hparams.warmup_steps, total // 2), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
