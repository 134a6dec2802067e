"""Cached pretraining steps, built from the configured training split before a run that needs them:

    tokenizer  a byte-level BPE in GPT-2's format (vocab.json + merges.txt) trained on the captions
    clip       a CLIP contrastively pretrained on the image-caption pairs (clip.pt, a state dict)
    lm         a decoder (GPT-2, or any `model_type` such as llama) language-model pretrained on the
               captions (a save_pretrained directory)

Each step writes into its own directory with a `manifest.json` (what was built from what: settings,
seed, steps and a hash of the training data), written last. A directory whose manifest equals the
wanted one is reused as it is; one that differs is rebuilt, with a line saying what changed. The
model then loads the result by path (`model.encoder=.../clip.pt`, `model.decoder=...`,
`model.tokenizer=...`), exactly as it loads published weights, and freezes what it is told to.
Every step runs on a forked random state: a cold cache does not shift the training run after it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from captioner.loggers import build_loggers  # importing it also quiets Lightning's logger advert for every Trainer
from captioner.data.coco import ImageRecord, load_records
from captioner.data.dataset import collate
from captioner.data.manifest import sole_writer
from captioner.data.pairs import CaptionTexts, ImageCaptionPairs, pairs_hash
from captioner.models.decoder import load_tokenizer
from captioner.models.zoo import GPT2_ARCHS, resolve

MANIFEST_VERSION = 1
EOS = "<|endoftext|>"


def _plain(value):
    return json.loads(json.dumps(value))  # tuples -> lists: as the manifest reads back


def is_current(directory: Path, wanted: Mapping, what: str, defaults: Mapping = {}) -> bool:
    """True when `directory` holds a finished build of exactly `wanted`; says why when it must be rebuilt.
    `defaults`: the value of a setting a manifest written before that setting existed was built with."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return False
    found = json.loads(manifest.read_text())
    changed = [f"{k}: {found.get(k)!r} -> {v!r}" for k, v in wanted.items() if found.get(k, defaults.get(k)) != v]
    if not changed:
        return True
    print(f"{what} in {directory} was built with other settings ({'; '.join(changed)[:300]}): rebuilding")
    manifest.unlink()  # the old files are replaced below; without a manifest they are never trusted
    return False


def _fit(trainer: L.Trainer, module: L.LightningModule, loader: DataLoader, val_loader: DataLoader | None, steps: int) -> None:
    """`trainer.fit`, then a check that every step was taken: an interrupted fit (Lightning returns
    from Ctrl-C) must not be recorded as a finished build."""
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val_loader)
    if trainer.global_step < steps:
        raise RuntimeError(f"pretraining stopped after {trainer.global_step} of {steps} steps: nothing was cached")


def _finish(directory: Path, wanted: Mapping) -> None:
    tmp = directory / "manifest.json.tmp"  # write-then-rename: a kill never leaves half a manifest
    tmp.write_text(json.dumps(wanted, indent=2))
    os.replace(tmp, directory / "manifest.json")


def _records(split: Mapping, what: str) -> list[ImageRecord]:
    records = load_records(dict(split))
    if not records:
        raise ValueError(f"{what}: the training split has no images ({dict(split)})")
    return records


def _batch(batch_size: int, items: int, what: str, least: int = 1) -> int:
    """The batch size for `items` training items: never more than there are (a batch larger than the
    data would make an epoch of no batches and train nothing), and an error when there is nothing to train on."""
    if items < least:
        raise ValueError(f"{what}: the training split has {items} caption(s), {least} or more are needed (data.splits.train)")
    return min(batch_size, items)


def _trainer(directory: Path, steps: int, batches: int, precision: str, val_every: int | None, loggers: Sequence = ()) -> L.Trainer:
    return L.Trainer(
        accelerator="auto", devices=1, max_steps=steps, precision=precision,
        max_epochs=-(-steps // batches),  # the epochs `steps` take: the progress bar reads "Epoch 2/5", not "2/-2"
        logger=[CSVLogger(directory, name="logs", version=""), *loggers],
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=val_every, check_val_every_n_epoch=None if val_every else 1,
        log_every_n_steps=10, gradient_clip_val=1.0, default_root_dir=directory,
    )


def train_tokenizer(captions: Sequence[str], out: str | Path, vocab_size: int) -> None:
    """A byte-level BPE in GPT-2's format, GPT-2's end-of-text its only special token."""
    from tokenizers import ByteLevelBPETokenizer

    Path(out).mkdir(parents=True, exist_ok=True)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(captions, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    tokenizer.save_model(str(out))  # vocab.json + merges.txt


def build_tokenizer(out: str | Path, train: Mapping, vocab_size: int = 512) -> Path:
    """`out/`: the tokenizer of the training captions (GPT-2's own cannot be downloaded here)."""
    out = Path(out)
    records = _records(train, "tokenizer")
    wanted = {"kind": "byte-level BPE", "version": MANIFEST_VERSION, "vocab_size": vocab_size, "data": pairs_hash(records)}
    with sole_writer(out):
        if is_current(out, wanted, "the tokenizer"):
            return out
        out.mkdir(parents=True, exist_ok=True)
        train_tokenizer([c for r in records for c in r.captions], out, vocab_size)
        _finish(out, wanted)
    return out


def build_clip(
    out: str | Path,
    train: Mapping,
    arch: Mapping,
    val: Mapping | None = None,
    steps: int = 600,
    batch_size: int = 256,
    lr: float = 5e-4,
    weight_decay: float = 0.1,
    warmup_steps: int = 50,
    seed: int = 0,
    precision: str = "32-true",
    preload: bool = True,
    val_every: int | None = 100,
    loggers: Sequence = (),
    loss: str = "infonce",
    max_resolution: int = 96,
) -> Path:
    """`out/clip.pt`: a CLIP of architecture `arch` trained contrastively (`loss`: infonce | sigmoid) on the
    pairs of `train`. `arch.image_resolution: auto` sees the images at their own size, at most
    `max_resolution` (`native_resolution`)."""
    from captioner.contrastive import ContrastiveCLIP

    out = Path(out)
    records = _records(train, "CLIP pretraining")
    if arch.get("image_resolution") == "auto":
        arch = {**arch, "image_resolution": native_resolution(records, arch["vision_patch_size"], max_resolution)}
    wanted = {
        "kind": "contrastive CLIP", "version": MANIFEST_VERSION, "arch": _plain(arch), "steps": steps,
        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
        "seed": seed, "precision": precision, "pairs": sum(len(r.captions) for r in records), "data": pairs_hash(records),
        "loss": loss,
    }
    with sole_writer(out), torch.random.fork_rng(devices=[]):
        if is_current(out, wanted, "the pretrained CLIP", defaults={"loss": "infonce"}):  # CLIPs from before the option
            return out / "clip.pt"
        torch.manual_seed(seed)
        module = ContrastiveCLIP(arch, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, seed=seed, loss=loss)
        from clip.clip import _transform

        dataset = partial(ImageCaptionPairs, preprocess=_transform(module.clip.visual.input_resolution),
                          context_length=module.clip.context_length, preload=preload)
        pairs = dataset(records)
        # a contrastive batch needs another pair to tell its own apart from
        loader = DataLoader(pairs, batch_size=_batch(batch_size, len(pairs), "CLIP pretraining", least=2), shuffle=True,
                            drop_last=True, generator=torch.Generator().manual_seed(seed))
        val_loaders = None
        if val:  # every validation image against every validation image's first caption
            val_pairs = dataset(_records(val, "CLIP validation"), first_only=True)
            val_loaders = DataLoader(val_pairs, batch_size=len(val_pairs))
        out.mkdir(parents=True, exist_ok=True)
        trainer = _trainer(out, steps, len(loader), precision, val_every if val_loaders else None, loggers)
        _fit(trainer, module, loader, val_loaders, steps)
        if val_loaders:
            trainer.validate(module, val_loaders, verbose=False)
        tmp = out / "clip.pt.tmp"
        torch.save(module.clip.state_dict(), tmp)
        os.replace(tmp, out / "clip.pt")
        _finish(out, wanted)
    return out / "clip.pt"


def native_resolution(records: Sequence[ImageRecord], patch: int, max_resolution: int, sample: int = 256) -> int:
    """The training images' median longer side (read from up to `sample` files' headers), rounded to an
    even number of patches (pixel shuffle's 2 x 2 blocks tile the grid), between two patches and
    `max_resolution`. A tower pretrained on the data sees its shapes at the size they were drawn: scaling
    96-pixel images to 64 cost a held-out world 35 points of scene accuracy (docs/results/binding.md);
    `max_resolution` bounds the cost, which grows with the square of the side."""
    from PIL import Image

    step = max(1, len(records) // sample)
    sides = []
    for record in records[::step][:sample]:
        try:
            with Image.open(record.path) as image:
                sides.append(max(image.size))
        except OSError:
            continue  # an unreadable image is reported by the feature store's extraction, not here
    if not sides:
        raise ValueError(f"pretrain.clip.arch.image_resolution=auto: none of {len(records)} training images could be read "
                         f"(first: {records[0].path}); give the resolution as a number")
    median = sorted(sides)[len(sides) // 2]
    unit = 2 * patch
    return min(max(unit, round(median / unit) * unit), max(unit, max_resolution // unit * unit))


def _fit_context(arch: Mapping, texts: Sequence[CaptionTexts | None]) -> dict:
    """`arch` with a context long enough for the longest text: captions of other data (and several to
    a text, `captions_per_text`) run longer than the embedded default's. The context is `n_positions`
    for GPT-2's fields, `max_position_embeddings` for a `model_type` architecture (models/decoder.py)."""
    longest = max((len(item["input_ids"]) for t in texts if t for item in t.items), default=0)
    if "model_type" in arch:
        from transformers import AutoConfig

        key = "max_position_embeddings"
        positions = arch.get(key) or getattr(AutoConfig.for_model(arch["model_type"]), key, 0)
    else:
        key = "n_positions"
        positions = resolve(arch, GPT2_ARCHS, "pretrain.lm.arch").get(key, 1024)  # GPT2Config's default
    return {**arch, key: max(positions, longest)}


def build_lm(
    out: str | Path,
    train: Mapping,
    tokenizer: str | Path,
    arch: Mapping,
    val: Mapping | None = None,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_steps: int = 100,
    max_tokens: int = 40,
    captions_per_text: int = 1,
    seed: int = 0,
    precision: str = "32-true",
    val_every: int | None = 250,
    loggers: Sequence = (),
) -> Path:
    """`out/`: a causal LM of architecture `arch` (GPT2Config fields, or a `model_type` mapping) pretrained as a language model on the training captions,
    `captions_per_text` captions of one image to a text (data/pairs.py::CaptionTexts)."""
    from captioner.caption_lm import CaptionLM

    out = Path(out)
    records = _records(train, "decoder pretraining")
    vocab = Path(tokenizer) / "vocab.json"
    wanted = {
        "kind": "caption language model", "version": MANIFEST_VERSION, "arch": _plain(arch), "steps": steps,
        "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
        "max_tokens": max_tokens, "captions_per_text": captions_per_text, "seed": seed, "precision": precision,
        "data": pairs_hash(records),
        "tokenizer": hashlib.sha256(vocab.read_bytes()).hexdigest() if vocab.is_file() else str(tokenizer),
    }
    with sole_writer(out), torch.random.fork_rng(devices=[]):
        if is_current(out, wanted, "the pretrained decoder"):
            return out
        torch.manual_seed(seed)
        text_tokenizer = load_tokenizer(str(tokenizer))
        texts = CaptionTexts(records, text_tokenizer, max_tokens, captions_per_text)
        val_texts = CaptionTexts(_records(val, "decoder validation"), text_tokenizer, max_tokens, captions_per_text) if val else None
        module = CaptionLM(_fit_context(arch, [texts, val_texts]), str(tokenizer), lr=lr, weight_decay=weight_decay,
                           warmup_steps=warmup_steps, seed=seed)
        pad = partial(collate, pad_id=module.tokenizer.pad_token_id)
        loader = DataLoader(texts, batch_size=_batch(batch_size, len(texts), "decoder pretraining"), shuffle=True,
                            drop_last=True, collate_fn=pad, generator=torch.Generator().manual_seed(seed))
        val_loader = DataLoader(val_texts, batch_size=256, collate_fn=pad) if val_texts else None
        out.mkdir(parents=True, exist_ok=True)
        trainer = _trainer(out, steps, len(loader), precision, val_every if val_loader else None, loggers)
        _fit(trainer, module, loader, val_loader, steps)
        module.gpt2.save_pretrained(out)  # config.json + model.safetensors
        _finish(out, wanted)
    return out


def prepare(pretrain: Mapping | None, loggers: Sequence = ()) -> None:
    """Build (or find) every step configured under `pretrain` (`conf/pretrain/*.yaml`), in order."""
    from captioner.config import group_removed

    if not pretrain or group_removed("pretrain"):  # pretrain=null: an experiment's tweaks to it may remain, alone
        return
    if not isinstance(pretrain, dict):  # a DictConfig: plain values for the manifests
        from omegaconf import OmegaConf

        pretrain = OmegaConf.to_container(pretrain, resolve=True)
    steps = {"tokenizer": build_tokenizer, "clip": build_clip, "lm": build_lm}
    for name, settings in pretrain.items():
        if name not in steps or not settings:
            continue
        settings = dict(settings)
        if name != "tokenizer":
            settings["loggers"] = loggers
        steps[name](**settings)


def run_steps(cfg, names: Sequence[str]) -> dict[str, Path]:
    """What `python -m captioner.pretrain_clip` / `pretrain_lm` do: write the embedded dataset when it is
    configured, then build the named steps of `cfg.pretrain` (cached), logging to `cfg.logger` too."""
    from omegaconf import OmegaConf

    from captioner.config import group_removed

    if not cfg.get("pretrain") or group_removed("pretrain"):
        raise ValueError("nothing to pretrain: this config has pretrain=null (use pretrain=tiny)")
    if cfg.data.get("synthetic"):
        from captioner.data.synthetic import write_dataset

        write_dataset(**OmegaConf.to_container(cfg.data.synthetic, resolve=True))
    loggers = build_loggers(cfg.get("logger"))
    pretrain = OmegaConf.to_container(cfg.pretrain, resolve=True)
    prepare({name: pretrain[name] for name in names if pretrain.get(name)}, loggers)
    built = {name: Path(pretrain[name]["out"]) for name in names if pretrain.get(name)}
    for name, path in built.items():
        print(f"{name}: {path.resolve()}")
    return built
