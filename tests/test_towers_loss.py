"""SigLIP's sigmoid loss as the embedded tower's pretraining option: the loss is SigLIP's, and pretraining runs
with it (learnable temperature from 10, bias from -10) and records it."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from captioner.contrastive import ContrastiveCLIP, sigmoid_loss
from captioner.data.synthetic import write_dataset
from captioner.models.encoder import ClipEncoder
from captioner.pretraining import build_clip
from conftest import CONF

ARCH = {**OmegaConf.to_container(OmegaConf.load(CONF / "pretrain" / "tiny.yaml"))["clip"]["arch"], "image_resolution": 64}  # the embedded data's "auto"


def _batch(n: int = 6, dim: int = 8):
    g = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1), F.normalize(torch.randn(n, dim, generator=g), dim=-1)


def test_the_sigmoid_loss_equals_open_clips_siglip_loss():
    from open_clip.loss import SigLipLoss

    image, text = _batch()
    scale, bias = torch.tensor(7.5), torch.tensor(-3.0)
    ours = sigmoid_loss(image, text, scale, bias, torch.arange(6))
    reference = SigLipLoss()(image, text, scale, bias)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_two_captions_of_one_image_are_both_positives():
    """The pairwise definition, summed by hand: +1 for every pair of one image, -1 otherwise, over B."""
    image, text = _batch()
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    total = 0.0
    for i in range(6):
        for j in range(6):
            z = 1.0 if ids[i] == ids[j] else -1.0
            total += math.log(1 + math.exp(-z * (scale.item() * image[i].dot(text[j]).item() + bias.item())))
    torch.testing.assert_close(sigmoid_loss(image, text, scale, bias, ids).item(), total / 6, atol=1e-5, rtol=0)


def test_siglip_initialises_its_temperature_and_bias_and_trains_them():
    module = ContrastiveCLIP(ARCH, loss="sigmoid")
    assert module.clip.logit_scale.item() == pytest.approx(math.log(10)) and module.logit_bias.item() == -10.0
    module._trainer = SimpleNamespace(max_steps=10)  # all configure_optimizers reads of the Trainer
    optimizer = module.configure_optimizers()["optimizer"]
    assert any(p is module.logit_bias for group in optimizer.param_groups for p in group["params"])
    with pytest.raises(ValueError, match=r"pretrain.clip.loss='hinge': choose one of \('infonce', 'sigmoid'\)"):
        ContrastiveCLIP(ARCH, loss="hinge")


def test_pretraining_runs_a_few_steps_with_the_sigmoid_loss(tmp_path):
    root = write_dataset(tmp_path / "world", seed=3, sizes={"train": 48, "val": 16})
    train = {"format": "coco", "annotations": str(root / "annotations" / "captions_train.json"), "images": str(root / "images" / "train")}
    out = tmp_path / "clip"
    path = build_clip(out, train, ARCH, steps=3, batch_size=16, warmup_steps=1, val_every=None, loss="sigmoid")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loss"] == "sigmoid"
    state = torch.load(path, weights_only=True)
    assert state["logit_scale"].item() != pytest.approx(math.log(10))  # the temperature moved: it is learnt
    assert ClipEncoder(str(path)).num_tokens == (ARCH["image_resolution"] // ARCH["vision_patch_size"]) ** 2
    # another loss is another CLIP: the cache is rebuilt, not reused
    build_clip(out, train, ARCH, steps=3, batch_size=16, warmup_steps=1, val_every=None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loss"] == "infonce"
    del manifest["loss"]  # a CLIP pretrained before the option existed: InfoNCE, still current
    (out / "manifest.json").write_text(json.dumps(manifest))
    built = path.stat().st_mtime_ns
    build_clip(out, train, ARCH, steps=3, batch_size=16, warmup_steps=1, val_every=None)
    assert path.stat().st_mtime_ns == built
