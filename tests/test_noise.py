"""Noise on CLIP features: the configured statistics, CapDec's normalisation, training batches only."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from captioner.api import Captioner
from captioner.data.noise import add_noise
from captioner.generate import Decoding
from captioner.results import caption_split


@pytest.mark.parametrize("variance,rate", [(0.016, 1.0), (0.016, 0.1), (0.05, 0.5)])
def test_injected_noise_has_the_configured_mean_variance_and_share(variance, rate):
    x = torch.randn(2000, 512) * 3
    delta = add_noise(x, variance, rate, normalize=False, generator=torch.Generator().manual_seed(0)) - x
    touched = delta != 0
    assert abs(touched.float().mean().item() - rate) < 0.01
    assert abs(delta[touched].mean().item()) < 4 * math.sqrt(variance / touched.sum().item())  # 4 standard errors
    assert abs(delta[touched].var().item() / variance - 1) < 0.03


def test_capdec_normalises_before_and_after():
    x = torch.randn(4000, 512) * 7
    before = x.clone()
    g = torch.Generator().manual_seed(0)
    noisy = add_noise(x, 0.016, 1.0, normalize=True, generator=g)
    assert torch.equal(x, before)  # the input is left as it was
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(4000), atol=1e-5)
    # unit x plus N(0, s2) in each of E dims has squared norm ~ 1 + E*s2, so cos(noisy, x) ~ 1/sqrt(1 + E*s2):
    # 0.33 for s2 = 0.016, E = 512; a std of 0.016 (a classic slip) would give 0.97
    cos = torch.nn.functional.cosine_similarity(noisy, x, dim=-1).mean().item()
    assert abs(cos - 1 / math.sqrt(1 + 512 * 0.016)) < 0.01
    add_noise(x, 0.016, 0.5, normalize=False, generator=g)
    assert torch.equal(x, before)  # raw features too
    assert torch.allclose(add_noise(x, 0.0, 1.0), torch.nn.functional.normalize(x, dim=-1))


def test_bad_noise_settings_are_refused():
    with pytest.raises(ValueError, match="data.noise"):
        add_noise(torch.randn(2, 8), 0.016, rate=10)
    with pytest.raises(ValueError, match="data.noise"):
        add_noise(torch.randn(2, 8), -1.0)


def test_configs_hold_capdec_and_the_papers_rate(smoke_cfg):
    assert dict(smoke_cfg().data.noise) == {"variance": 0.016, "rate": 0.1, "normalize": True}  # the paper's
    assert smoke_cfg("experiment=text_only").data.noise.rate == 1.0  # CapDec: every dimension


class Spy(L.Callback):
    """The batches the module receives, after the datamodule's transfer hook (where noise is added)."""

    def __init__(self):
        self.seen = {"train": [], "val": [], "test": []}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen["train"].append({k: v.clone() for k, v in batch.items()})

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.seen["val"].append({k: v.clone() for k, v in batch.items()})


def stored(datamodule, split, image_ids, key):
    store = datamodule.datasets[split].store
    return torch.stack([store.features(int(i))[key] for i in image_ids])


def test_a_real_fit_noises_training_batches_only_with_the_configured_statistics(smoke_cfg):
    cfg = smoke_cfg("data.noise.variance=0.02", "data.noise.rate=1.0", "model.normalize_features=false")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # writes the embedded dataset and the tokenizer the module reads
    module = instantiate(cfg.model)
    spy = Spy()
    trainer = L.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[spy])
    trainer.fit(module, datamodule=datamodule)
    features = module.model.features  # how train.py scores the test split (captioner.evaluate, through the Captioner's model core)
    module.model.features = lambda batch: spy.seen["test"].append(batch) or features(batch)
    caption_split(Captioner(module), datamodule, "test", Decoding(strategy="greedy", max_new_tokens=3))
    assert spy.seen["val"] and spy.seen["test"]
    for split in ("val", "test"):  # clean: exactly the stored features
        for batch in spy.seen[split]:
            for key in ("clip_features", "patch_tokens"):
                assert torch.equal(batch[key], stored(datamodule, split, batch["image_id"], key)), (split, key)
    deltas = torch.cat([(b["clip_features"] - stored(datamodule, "train", b["image_id"], "clip_features")).flatten()
                        for b in spy.seen["train"]])
    assert len(spy.seen["train"]) == 2 and (deltas != 0).float().mean() > 0.99
    assert abs(deltas.mean().item()) < 4 * math.sqrt(0.02 / deltas.numel())
    assert abs(deltas.var().item() / 0.02 - 1) < 0.1
