"""Pretraining sizes itself from the data it is given: other captions, a split smaller than a batch."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from captioner.data.synthetic import write_dataset
from captioner.models.decoder import load_decoder, load_tokenizer
from captioner.pretraining import build_clip, build_lm, build_tokenizer
from conftest import CONF

PRETRAIN = OmegaConf.to_container(OmegaConf.load(CONF / "pretrain" / "tiny.yaml"))
LM_ARCH = {**OmegaConf.load(CONF / "pretrain" / "lm" / "gpt2.yaml")["arch"], "n_layer": 1, "n_embd": 32, "n_head": 2}  # the default's context of 64 positions


def test_real_captions_two_to_a_text_get_a_context_that_holds_them(coco_mini, tmp_path):
    """coco_mini's captions, two to a text as the default pretrains, run past the tiny GPT-2's 64 positions."""
    train = {"annotations": str(coco_mini / "annotations" / "captions_train2017_subset80.json"),
             "images": str(coco_mini / "images" / "train2017")}
    tokenizer = build_tokenizer(tmp_path / "tokenizer", train, vocab_size=512)
    out = build_lm(tmp_path / "gpt2", train, tokenizer, LM_ARCH, steps=2, batch_size=16, warmup_steps=1,
                   max_tokens=40, captions_per_text=2, val_every=None)
    config = json.loads((out / "config.json").read_text())
    assert config["n_positions"] > LM_ARCH["n_positions"]
    assert json.loads((out / "manifest.json").read_text())["steps"] == 2


def _world(tmp_path, train: int):
    root = write_dataset(tmp_path / "world", seed=3, sizes={"train": train, "val": 2, "test": 2})
    return {"annotations": str(root / "annotations" / "captions_train.json"), "images": str(root / "images" / "train")}


def test_a_split_smaller_than_one_batch_still_trains_every_step(tmp_path):
    train = _world(tmp_path, 3)  # 15 captions against a batch of 64
    tokenizer = build_tokenizer(tmp_path / "tokenizer", train, vocab_size=300)
    out = build_lm(tmp_path / "gpt2", train, tokenizer, LM_ARCH, steps=3, batch_size=64, warmup_steps=1, val_every=None)
    trained = load_decoder(str(out), load_tokenizer(str(tokenizer)))
    initial = load_decoder(LM_ARCH, load_tokenizer(str(tokenizer)))  # the same seeded weights it started from
    assert not torch.equal(trained.transformer.h[0].mlp.c_fc.weight, initial.transformer.h[0].mlp.c_fc.weight)
    assert json.loads((out / "manifest.json").read_text())["steps"] == 3


def test_nothing_to_train_on_is_one_clear_error(tmp_path):
    root = tmp_path / "one"
    (root / "images").mkdir(parents=True)
    source = write_dataset(tmp_path / "world", seed=3, sizes={"train": 1, "val": 1, "test": 1})
    image = next((source / "images" / "train").iterdir())
    (root / "images" / image.name).write_bytes(image.read_bytes())
    coco = json.loads((source / "annotations" / "captions_train.json").read_text())
    coco["annotations"] = coco["annotations"][:1]
    (root / "captions.json").write_text(json.dumps(coco))
    train = {"annotations": str(root / "captions.json"), "images": str(root / "images")}
    with pytest.raises(ValueError, match=r"CLIP pretraining: the training split has 1 caption\(s\), 2 or more are needed"):
        build_clip(tmp_path / "clip", train, PRETRAIN["clip"]["arch"], steps=2, batch_size=8, val_every=None)
    assert not (tmp_path / "clip" / "manifest.json").exists()
