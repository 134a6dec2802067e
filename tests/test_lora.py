"""LoRA as the third decoder mode: only adapters and the mapper learn; export merges them exactly."""

from __future__ import annotations

import pytest
import torch

from captioner.models.caption_model import CaptionModel
from test_language_models import FAMILIES, saved  # noqa: F401 - the saved tiny decoders fixture

TINY_CLIP = {"embed_dim": 32, "image_resolution": 32, "vision_layers": 1, "vision_width": 64, "vision_patch_size": 8,
             "context_length": 8, "vocab_size": 49408, "transformer_width": 32, "transformer_heads": 2, "transformer_layers": 1}


def model_for(saved, family: str, mode: str, **kwargs) -> CaptionModel:
    arch = {k: v for k, v in FAMILIES[family][0].items() if k != "initializer_range"}  # the family's default init
    return CaptionModel(TINY_CLIP, arch, str(saved[family][1]), {"name": "mlp"}, prefix_length=4,
                        decoder_mode=mode, **kwargs)


def batch(model: CaptionModel) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, model.tokenizer.eos_token_id], [8, 9, model.tokenizer.eos_token_id, 0]])
    return {"clip_features": torch.randn(2, 32), "input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapters_and_the_mapper_receive_gradients(family, saved):
    model = model_for(saved, family, "lora")
    model(batch(model)).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    assert all("lora_" in name or name.startswith("mapper.") for name in trainable)
    assert any("lora_B" in name for name in with_grad) and any(name.startswith("mapper.") for name in with_grad)
    counts = model.trainable_parameters()
    assert 0 < counts["decoder"][0] < counts["decoder"][1] / 4 and counts["encoder"][0] == 0


def test_frozen_and_finetuned_decoders_follow_the_one_rule(saved):
    frozen, tuned = model_for(saved, "llama", "frozen"), model_for(saved, "llama", "finetune")
    frozen.train(), tuned.train()
    assert not frozen.decoder.training and not frozen.encoder.training and frozen.mapper.training
    assert tuned.decoder.training and not tuned.encoder.training
    assert not any(p.requires_grad for p in frozen.decoder.parameters()) and all(p.requires_grad for p in tuned.decoder.parameters())
    with pytest.raises(ValueError, match="decoder_mode='partial'"):
        model_for(saved, "llama", "partial")
    with pytest.raises(ValueError, match="unknown LoRA option"):
        model_for(saved, "llama", "lora", lora={"rank": 4})


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_adapters_give_the_unmerged_logits(family, saved):
    model = model_for(saved, family, "lora", lora={"r": 4, "alpha": 8}).eval()
    data = batch(model)
    with torch.no_grad():
        base = model(data).logits  # lora_B starts at zero: the base decoder's logits
        for name, p in model.decoder.named_parameters():  # trained adapters are not zero
            if "lora_B" in name:
                p.normal_(0, 0.5)
        before = model(data).logits
        model.merge_adapters()
        after = model(data).logits
    assert model.decoder_mode == "finetune" and not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert (before - base).abs().max() > 1e-3  # the adapters changed the logits


def test_a_lora_run_exports_merged_with_the_same_logits(smoke_cfg, tmp_path, capsys):
    from captioner.checkpoint import load_module
    from captioner.export import export
    from captioner.train import run as train

    train(smoke_cfg("score=false", "model.decoder_mode=lora", "model.lora.r=4"))
    assert "trainable parameters (lora decoder)" in capsys.readouterr().out
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trained, exported = load_module(ckpt), load_module(export(ckpt, tmp_path / "export"))
    assert trained.model.decoder_mode == "lora" and exported.model.decoder_mode == "finetune"
    assert any("lora_" in k for k in trained.state_dict()) and not any("lora_" in k for k in exported.state_dict())
    data = batch(trained.model)
    data["patch_tokens"] = torch.randn(2, trained.encoder.num_tokens, trained.encoder.token_dim)
    with torch.no_grad():
        torch.testing.assert_close(exported(data).logits, trained(data).logits, atol=1e-5, rtol=0)
