"""The LightningModule of cross-entropy training around the model core (frozen CLIP -> mapper -> LM).

It takes plain values and builds its `CaptionModel`, so `CaptionModule.load_from_checkpoint(path)`
works without Hydra and the saved hyperparameters describe the model. The model's weights sit under
`model.` in the state dict; checkpoints written before that (`encoder.`, `mapper.`, `decoder.` at the
top) load too.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from captioner.generate import Decoding, decoding_from
from captioner.metrics import report
from captioner.models.caption_model import CaptionModel
from captioner.models.decoder import tokenizer_files
from captioner.scene import scene_accuracy, scenes_of


ADAMW = {"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}  # torch.optim.AdamW flags

# Lightning 2.6's pytree helper still builds torch's deprecated LeafSpec on every batch it moves
warnings.filterwarnings("ignore", message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"), category=FutureWarning,
                        module=r"lightning\.pytorch\.utilities\._pytree")


class CaptionModule(L.LightningModule):
    """Cross-entropy training of a `CaptionModel` (captioner/models/caption_model.py), held as `self.model`."""

    def __init__(
        self,
        encoder: str | Mapping = "ViT-B/32",  # a name/path loads CLIP; a mapping builds it randomly
        decoder: str | Mapping = "gpt2",  # a hub name or save_pretrained directory; a mapping builds one (models/decoder.py)
        tokenizer: str = "gpt2",  # a save_pretrained tokenizer directory, GPT-2's vocab.json + merges.txt, or a hub name
        mapper: Mapping | None = None,  # {name: a registered mapper (models/registry.py), ...its options}
        prefix_length: int = 10,
        freeze_decoder: bool = False,  # ClipCap's "frozen GPT-2" variant when true (decoder_mode=frozen)
        decoder_mode: str | None = None,  # finetune | frozen | lora; None: frozen when freeze_decoder else finetune
        lora: Mapping | None = None,  # decoder_mode=lora: {r, alpha, dropout, target_modules} (models/lora.py)
        normalize_features: bool = True,  # L2-normalise CLIP features before the mapper (CapDec)
        encoder_precision: str = "fp32",
        lr: float = 2e-5,
        decoder_lr: float | None = None,  # the decoder's own learning rate (its weights and adapters); None: lr
        weight_decay: float = 0.0,
        warmup_steps: int = 5000,
        val_decoding: Mapping | None = None,
        val_cider_images: int = 100,  # validation images captioned for val/cider each epoch
        seed: int = 0,
        adamw: str = "foreach",  # foreach: one kernel per op over all tensors | fused: one kernel per step (CPU and CUDA) | loop: per tensor
        compile: bool = False,  # torch.compile the decoder and the mapper before training (a GPU's switch; slow to compile on CPU)
    ):
        super().__init__()
        mode = decoder_mode or ("frozen" if freeze_decoder else "finetune")
        if freeze_decoder and mode != "frozen":
            raise ValueError(f"freeze_decoder=true and decoder_mode={decoder_mode}: set only decoder_mode (model.decoder_mode)")
        self.save_hyperparameters(
            {
                "encoder": encoder, "decoder": decoder, "tokenizer": tokenizer, "mapper": mapper,
                "prefix_length": prefix_length, "freeze_decoder": mode == "frozen", "decoder_mode": mode, "lora": lora,
                "normalize_features": normalize_features, "encoder_precision": encoder_precision,
                "lr": lr, "decoder_lr": decoder_lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                "val_decoding": val_decoding, "val_cider_images": val_cider_images, "seed": seed,
                "adamw": adamw, "compile": compile,
            }
        )
        if adamw not in ADAMW:
            raise ValueError(f"adamw={adamw!r} is not one of {sorted(ADAMW)} (model.adamw)")
        self.model = CaptionModel(encoder, decoder, tokenizer, mapper, prefix_length, decoder_mode=mode, lora=lora,
                                  normalize_features=normalize_features, encoder_precision=encoder_precision, seed=seed)
        self.hparams["prefix_length"] = self.model.prefix_length  # a token-for-token bridge's own count, as built
        self.register_load_state_dict_pre_hook(_under_model)
        self.val_decoding: Decoding = decoding_from(val_decoding)
        self._val_captions: dict[int, str] = {}

    # the model's parts by their names, for callers that predate `self.model`
    encoder = property(lambda self: self.model.encoder)
    mapper = property(lambda self: self.model.mapper)
    decoder = property(lambda self: self.model.decoder)
    tokenizer = property(lambda self: self.model.tokenizer)

    def eval_while_training(self) -> list[nn.Module]:
        """The parts kept in eval mode on purpose while training: the model's frozen parts."""
        return self.model.frozen_parts()

    def on_fit_start(self) -> None:
        # Lightning warns about every module in eval mode when training starts; ours are in eval mode on
        # purpose. Only that exact count is silenced: any other module left in eval mode still warns.
        count = sum(1 for part in self.eval_while_training() for _ in part.modules())
        warnings.filterwarnings("ignore", message=re.escape(f"Found {count} module(s) in eval mode at the start of training."))
        if self.trainer.is_global_zero:
            counts = self.model.trainable_parameters()
            parts = ", ".join(f"{name} {t:,}/{n:,}" for name, (t, n) in counts.items() if name != "all")
            print(f"trainable parameters ({self.model.decoder_mode} decoder): {counts['all'][0]:,} of {counts['all'][1]:,} ({parts})")

    def features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model.features(batch)

    def prefix(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model.prefix(batch)

    def forward(self, batch: Mapping[str, torch.Tensor]):
        return self.model(batch)

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
        return self.model.caption(batch, decoding or self.val_decoding)

    def configure_model(self) -> None:
        if self.hparams.get("compile") and self.decoder._compiled_call_impl is None:  # in place: the state dict keeps its keys
            self.decoder.compile()
            self.mapper.compile()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the tokenizer's files travel with the weights: the checkpoint captions after data/ is gone
        checkpoint["tokenizer_files"] = tokenizer_files(self.hparams.tokenizer, self.tokenizer)
        # and what rebuilds a decoder that was loaded from a directory (the pretrained tiny decoder in data/)
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

    def parameter_groups(self) -> list[dict]:
        """The trainable weights (frozen ones never reach the optimizer), the decoder's apart when `decoder_lr` is set."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        decoder_lr = self.hparams.get("decoder_lr")  # older checkpoints have no `decoder_lr`
        if decoder_lr is None:
            return [{"params": trainable}]
        in_decoder = {id(p) for p in self.model.decoder.parameters()}
        decoder = [p for p in trainable if id(p) in in_decoder]  # empty when the decoder is frozen
        rest = [{"params": [p for p in trainable if id(p) not in in_decoder]}]
        return rest + [{"params": decoder, "lr": decoder_lr}] if decoder else rest

    def configure_optimizers(self):
        flags = ADAMW[self.hparams.get("adamw", "foreach")]  # older checkpoints have no `adamw`
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, **flags)
        total = self.trainer.estimated_stepping_batches
        scheduler = BudgetSchedule(optimizer, min(self.hparams.warmup_steps, total // 2), total, self._time_used())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _time_used(self) -> Callable[[], float] | None:
        """The share of `trainer.max_time` gone, read off Lightning's Timer; None without a time limit, and for
        more than one process, whose clocks differ and whose learning rates must not."""
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if timer is None or timer.time_remaining() is None or self.trainer.world_size > 1:
            return None
        limit = timer.time_elapsed() + timer.time_remaining()  # trainer.max_time in seconds
        return lambda: timer.time_elapsed() / limit


class BudgetSchedule(LambdaLR):
    """Linear warm-up over `warmup` steps, then a linear decay that reaches zero where training ends: at step
    `total`, or when the time is up if `time_used` (the share of a time limit gone) says that comes first.

    After the warm-up, time counts as steps at the budget's pace: the decay stands at the further on of the
    steps' progress and the time's, each measured from the end of the warm-up (what start-up and warm-up took
    is not counted against the rest). A run whose steps keep ahead of its time follows transformers' linear
    schedule with warm-up step for step; a run the time limit stops first (`trainer.max_time` on a slower or
    busier machine) still ends at zero rather than part way down, so its final weights are annealed, as
    `score_weights: last` expects. The time's share at the end of the warm-up is part of the scheduler's
    state, so a resumed run keeps it."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, total: int,
                 time_used: Callable[[], float] | None = None):
        self.warmup, self.total, self.time_used = warmup, total, time_used
        self.time_at_warmup: float | None = None

        def factor(step: int) -> float:  # a plain function: LambdaLR keeps it out of the state dict
            return self.factor(step)
        super().__init__(optimizer, factor)

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        by_steps = max(0.0, (self.total - step) / max(1, self.total - self.warmup))  # transformers' formula, to the bit
        if self.time_used is None:
            return by_steps
        used = self.time_used()
        if self.time_at_warmup is None:
            self.time_at_warmup = used
        by_time = max(0.0, 1 - (used - self.time_at_warmup) / max(1e-9, 1 - self.time_at_warmup))
        return min(by_steps, by_time)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("time_used")  # the clock belongs to this process, not to the checkpoint
        return state


PARTS = ("encoder.", "mapper.", "decoder.")


def _under_model(module, state_dict, prefix, *args) -> None:
    """Move a state dict's top-level `encoder.` / `mapper.` / `decoder.` keys under `model.` (in place)."""
    for key in [k for k in state_dict if k.startswith(tuple(prefix + p for p in PARTS))]:
        state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)
