"""CLIP's own pretraining (Radford et al. 2021), for a CLIP of any size: symmetric InfoNCE over
image-caption pairs, so the image and text towers are aligned as in OpenAI's released models; or
SigLIP's pairwise sigmoid loss (Zhai et al. 2023), `loss="sigmoid"`, with its learnable bias.

The embedded default pretrains its tiny CLIP this way on its training split before the captioner
freezes it (a *random* frozen ViT keeps shape out of its pooled vector, which no real CLIP does);
users can domain-adapt a CLIP on their own pairs. The weights are a full `clip.model.CLIP` state
dict, which `clip.model.build_model` (and so `model.encoder=PATH`) reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning as L
import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from captioner.models.encoder import load_clip


def info_nce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the (B, B) cosine logits of unit vectors `image`, `text`.

    Two captions of one image in a batch are both its positives: the target of each row is spread
    evenly over the columns of the same image, so no true pair is pushed apart."""
    logits = scale * image @ text.T  # (B, B)
    positive = (image_ids[:, None] == image_ids[None, :]).float()  # (B, B), symmetric
    target = positive / positive.sum(dim=1, keepdim=True)
    image_to_text = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(target * logits.log_softmax(dim=0)).sum(dim=0).mean()
    return (image_to_text + text_to_image) / 2


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 image_ids: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: every (image, caption) pair of the batch is a binary question, "do these belong
    together?", on the logit `scale * cos + bias`; summed over the (B, B) pairs and divided by B.

    A caption of the same image is a positive wherever it sits in the batch, as in `info_nce`."""
    logits = scale * image @ text.T + bias  # (B, B)
    labels = 2 * (image_ids[:, None] == image_ids[None, :]).float() - 1  # +1 together, -1 apart
    return -F.logsigmoid(labels * logits).sum() / len(image)


LOSSES = ("infonce", "sigmoid")
# SigLIP's initialisation: t' = log 10 (scale 10) and b = -10, so that the many negatives start near
# zero loss and the first steps do not spend themselves pushing everything apart
SIGMOID_SCALE_INIT, SIGMOID_BIAS_INIT = math.log(10), -10.0


def retrieval_top1(image: torch.Tensor, text: torch.Tensor) -> float:
    """Image -> text top-1: the share of images whose nearest caption (of N, one per image) is theirs."""
    nearest = (image @ text.T).argmax(dim=1)
    return nearest.eq(torch.arange(len(image), device=image.device)).float().mean().item()


class ContrastiveCLIP(L.LightningModule):
    """Trains every weight of a `clip.model.CLIP`; batches are {"pixels", "tokens", "image_id"}."""

    def __init__(
        self,
        arch: Mapping,  # clip.model.CLIP arguments (or {arch: ViT-B/32, ...}), random initialisation
        lr: float = 5e-4,
        weight_decay: float = 0.1,  # CLIP's 0.2 is for 400M pairs; a small set needs less
        warmup_steps: int = 50,
        seed: int = 0,
        loss: str = "infonce",  # infonce (CLIP) | sigmoid (SigLIP)
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"pretrain.clip.loss={loss!r}: choose one of {LOSSES}")
        self.save_hyperparameters()
        self.clip = load_clip(dict(arch), seed=seed)
        if loss == "sigmoid":  # the temperature lives in the CLIP (its state dict keeps it); the bias beside it
            with torch.no_grad():
                self.clip.logit_scale.fill_(SIGMOID_SCALE_INIT)
            self.logit_bias = torch.nn.Parameter(torch.tensor(SIGMOID_BIAS_INIT))

    def embed(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        image = F.normalize(self.clip.encode_image(batch["pixels"]).float(), dim=-1)  # (B, E)
        text = F.normalize(self.clip.encode_text(batch["tokens"]).float(), dim=-1)  # (B, E)
        return image, text

    def training_step(self, batch, batch_idx):
        image, text = self.embed(batch)
        scale = self.clip.logit_scale.exp()
        if self.hparams.loss == "sigmoid":
            loss = sigmoid_loss(image, text, scale, self.logit_bias, batch["image_id"])
        else:
            loss = info_nce(image, text, scale, batch["image_id"])
        self.log("pretrain/loss", loss, prog_bar=True, batch_size=len(image))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.hparams.loss == "infonce":
            with torch.no_grad():  # CLIP clips the temperature at 100 so the logits cannot blow up; SigLIP does not
                self.clip.logit_scale.clamp_(0, math.log(100))

    def validation_step(self, batch, batch_idx):
        image, text = self.embed(batch)
        self.log("val/retrieval_top1", retrieval_top1(image, text), prog_bar=True, batch_size=len(image))

    def configure_optimizers(self):
        # CLIP's recipe: AdamW, no decay on gains, biases, embeddings and the temperature
        decay = [p for n, p in self.clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in self.clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        rest += [self.logit_bias] if self.hparams.loss == "sigmoid" else []
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=(0.9, 0.98), eps=1e-6,
        )
        total = self.trainer.max_steps
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(self.hparams.warmup_steps, total // 2), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
