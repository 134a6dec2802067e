"""The LightningModule: frozen CLIP encoder -> mapper -> GPT-2.

It takes plain values and builds its own parts, so `CaptionModule.load_from_checkpoint(path)`
works without Hydra and the saved hyperparameters describe the model.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_linear_schedule_with_warmup

from captioner.generate import Decoding, decoding_from, generate
from captioner.metrics import report
from captioner.models.decoder import load_gpt2, load_tokenizer, tokenizer_files
from captioner.models.encoder import ClipEncoder
from captioner.models.mapper import build_mapper
from captioner.scene import scene_accuracy, scenes_of


ADAMW = {"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}  # torch.optim.AdamW flags

# Lightning 2.6's pytree helper still builds torch's deprecated LeafSpec on every batch it moves
warnings.filterwarnings("ignore", message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"), category=FutureWarning,
                        module=r"lightning\.pytorch\.utilities\._pytree")


class CaptionModule(L.LightningModule):
    def __init__(
        self,
        encoder: str | Mapping = "ViT-B/32",  # a name/path loads CLIP; a mapping builds it randomly
        decoder: str | Mapping = "gpt2",  # a name/path loads GPT-2; a mapping of GPT2Config fields builds it
        tokenizer: str = "gpt2",  # a directory with vocab.json + merges.txt, or a hub name
        mapper: Mapping | None = None,  # {name: attention|transformer|mlp, ...its arguments}
        prefix_length: int = 10,
        freeze_decoder: bool = False,  # ClipCap's "frozen GPT-2" variant when true
        normalize_features: bool = True,  # L2-normalise CLIP features before the mapper (CapDec)
        encoder_precision: str = "fp32",
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 5000,
        val_decoding: Mapping | None = None,
        val_cider_images: int = 100,  # validation images captioned for val/cider each epoch
        seed: int = 0,
        adamw: str = "foreach",  # foreach: one kernel per op over all tensors | fused: one kernel per step (CPU and CUDA) | loop: per tensor
        compile: bool = False,  # torch.compile GPT-2 and the mapper before training (a GPU's switch; slow to compile on CPU)
    ):
        super().__init__()
        self.save_hyperparameters(
            {
                "encoder": encoder, "decoder": decoder, "tokenizer": tokenizer, "mapper": mapper,
                "prefix_length": prefix_length, "freeze_decoder": freeze_decoder,
                "normalize_features": normalize_features, "encoder_precision": encoder_precision,
                "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                "val_decoding": val_decoding, "val_cider_images": val_cider_images, "seed": seed,
                "adamw": adamw, "compile": compile,
            }
        )
        self.encoder = ClipEncoder(encoder, precision=encoder_precision)  # random weights: the spec's seed, as in the store
        self.tokenizer = load_tokenizer(tokenizer)
        self.decoder = load_gpt2(decoder, self.tokenizer, seed=seed)
        mapper = dict(mapper or {"name": "attention"})
        self.mapper = build_mapper(
            mapper.pop("name"),
            feature_dim=self.encoder.embed_dim,
            token_dim=self.encoder.token_dim,
            num_tokens=self.encoder.num_tokens,
            embed_dim=self.decoder.config.n_embd,
            prefix_length=prefix_length,
            **mapper,
        )
        if freeze_decoder:
            self.decoder.requires_grad_(False)
        self.decoder.train(not freeze_decoder)  # from_pretrained returns eval mode; Lightning keeps each module's mode
        if adamw not in ADAMW:
            raise ValueError(f"adamw={adamw!r} is not one of {sorted(ADAMW)} (model.adamw)")
        self.val_decoding: Decoding = decoding_from(val_decoding)
        self._val_captions: dict[int, str] = {}

    # frozen parts stay in eval mode (no dropout) whatever the Trainer switches
    def train(self, mode: bool = True) -> "CaptionModule":
        super().train(mode)
        self.encoder.eval()
        if self.hparams.freeze_decoder:
            self.decoder.eval()
        return self

    def eval_while_training(self) -> list[nn.Module]:
        """The parts kept in eval mode on purpose while training: the frozen encoder (and decoder)."""
        return [self.encoder, *([self.decoder] if self.hparams.freeze_decoder else [])]

    def on_fit_start(self) -> None:
        # Lightning warns about every module in eval mode when training starts; ours are in eval mode on
        # purpose. Only that exact count is silenced: any other module left in eval mode still warns.
        count = sum(1 for part in self.eval_while_training() for _ in part.modules())
        warnings.filterwarnings("ignore", message=re.escape(f"Found {count} module(s) in eval mode at the start of training."))

    def features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mapper's input from a batch with `pixels` or precomputed CLIP features."""
        key = self.mapper.input_key
        x = batch[key] if key in batch else self.encoder(batch["pixels"])[key]
        return F.normalize(x, dim=-1) if self.hparams.normalize_features else x

    def prefix(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.mapper(self.features(batch))  # (B, P, D)

    def forward(self, batch: Mapping[str, torch.Tensor]):
        prefix = self.prefix(batch)  # (B, P, D)
        b, p = prefix.shape[:2]
        tokens = self.decoder.get_input_embeddings()(batch["input_ids"])  # (B, S, D)
        embeds = torch.cat([prefix, tokens], dim=1)  # (B, P+S, D)
        ones = torch.ones((b, p), dtype=batch["attention_mask"].dtype, device=prefix.device)
        mask = torch.cat([ones, batch["attention_mask"]], dim=1)
        # the prefix is context, never a target: -100 there, and GPT-2 shifts labels itself
        ignore = torch.full((b, p), -100, dtype=torch.long, device=prefix.device)
        labels = torch.cat([ignore, batch["labels"]], dim=1)
        return self.decoder(inputs_embeds=embeds, attention_mask=mask, labels=labels)

    def training_step(self, batch, batch_idx):
        loss = self(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self(batch).loss
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        wanted = self.hparams.val_cider_images - len(self._val_captions)
        if wanted > 0:
            ids = batch["image_id"][:wanted].tolist()
            captions = self.caption_features({k: v[:wanted] for k, v in batch.items()}, self.val_decoding)
            self._val_captions.update(zip(ids, captions))

    def on_validation_epoch_end(self) -> None:
        captions, self._val_captions = self._val_captions, {}
        datamodule = getattr(self.trainer, "datamodule", None)
        if not captions or datamodule is None or self.trainer.sanity_checking:
            return
        references = datamodule.references("val")
        scores = report({i: references[i] for i in captions}, captions, meteor=False, human=False).model
        self.log("val/cider", scores["CIDEr"], prog_bar=True)
        self.log("val/bleu4", scores["Bleu_4"])
        scenes = self._scenes(datamodule)
        if scenes:  # synthetic data: are the captions right, not only phrased like the references?
            self.log("val/scene_accuracy", scene_accuracy(scenes, captions)["accuracy"], prog_bar=True)
        self.val_samples = [(i, captions[i], references[i]) for i in list(captions)[:8]]

    def _scenes(self, datamodule) -> dict | None:
        if not hasattr(self, "_val_scenes"):  # read once from the validation annotations
            self._val_scenes = scenes_of(getattr(datamodule, "splits", {}).get("val") or {})
        return self._val_scenes

    def caption_features(self, batch: Mapping[str, torch.Tensor], decoding: Decoding | None = None) -> list[str]:
        prefix = self.prefix(batch).to(self.decoder.dtype)  # (B, P, D): a bf16 GPT-2 (Captioner precision=bf16) takes bf16
        return generate(self.decoder, self.tokenizer, prefix, decoding or self.val_decoding)

    def configure_model(self) -> None:
        if self.hparams.get("compile") and self.decoder._compiled_call_impl is None:  # in place: the state dict keeps its keys
            self.decoder.compile()
            self.mapper.compile()
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the tokenizer's files travel with the weights: the checkpoint captions after data/ is gone
        checkpoint["tokenizer_files"] = tokenizer_files(self.hparams.tokenizer, self.tokenizer)
        # and what rebuilds a decoder that was loaded from a directory (the pretrained tiny GPT-2 in data/)
        checkpoint["decoder_config"] = self.decoder.config.to_dict()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning refuses to clip for a fused optimizer under any mixed precision, because a fused step unscales
        # fp16 gradients itself. Under bf16-mixed there is no scaler and the gradients are already true values, so
        # they are clipped here (trainer=gpu with adamw=fused and conf/trainer's clipping failed at its first step)
        if gradient_clip_val and optimizer.defaults.get("fused") and getattr(self.trainer.precision_plugin, "scaler", False) is None:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # frozen weights never reach the optimizer
        flags = ADAMW[self.hparams.get("adamw", "foreach")]  # older checkpoints have no `adamw`
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, **flags)
        total = self.trainer.estimated_stepping_batches
        scheduler = get_linear_schedule_with_warmup(optimizer, min(self.hparams.warmup_steps, total // 2), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
