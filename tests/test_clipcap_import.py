"""ClipCap checkpoints import with identical logits (the minGPT pattern: same weights, same inputs).

The reference is ClipCap's model (rmokady/CLIP_prefix_caption, train.py: `MLP`, `MultiHeadAttention`,
`TransformerLayer`, `Transformer`, `TransformerMapper`, `ClipCaptionModel`) as bench/clipcap.py writes
it out line for line for the training bench, so its state dict has ClipCap's exact key layout.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from captioner.import_clipcap import ClipCapImportError, import_clipcap, main
from captioner.pretraining import train_tokenizer
from captioner.module import CaptionModule
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))  # bench/ is scripts, not a package: bench/train.py imports clipcap the same way
from clipcap import ClipCaptionModel  # noqa: E402 - ClipCap's model, line for line

CLIP = {"embed_dim": 48, "image_resolution": 32, "vision_layers": 1, "vision_width": 64, "vision_patch_size": 16,
        "context_length": 16, "vocab_size": 49408, "transformer_width": 32, "transformer_heads": 2, "transformer_layers": 1}


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(["a red circle above a small blue square", "two green triangles"] * 20, out, vocab_size=300)
    return out


def clipcap_checkpoint(path, tokenizer_dir, mapping_type, stale, prefix_length=4, clip_length=3, seed=0):
    """A random ClipCap model saved as ClipCap saves it (`torch.save(model.state_dict())`)."""
    torch.manual_seed(seed)
    vocab = len(json.loads((tokenizer_dir / "vocab.json").read_text()))
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=64, n_layer=2, n_head=1))  # 64-wide heads, as GPT-2's
    model = ClipCaptionModel(gpt, prefix_length, clip_length, prefix_size=CLIP["embed_dim"], num_layers=2, mapping_type=mapping_type)
    state = model.state_dict()
    if stale:  # what transformers < 4.x wrote into every GPT-2 checkpoint
        for i in range(2):
            state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32, dtype=torch.uint8)).view(1, 1, 32, 32)
            state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, path)
    return model.eval()


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
@pytest.mark.parametrize("stale", [False, True], ids=["current-keys", "stale-attn-bias"])
def test_imported_logits_equal_clipcaps(mapping_type, stale, tmp_path, tokenizer_dir, capsys):
    reference = clipcap_checkpoint(tmp_path / "clipcap.pt", tokenizer_dir, mapping_type, stale)
    out = tmp_path / "imported.ckpt"
    main([str(tmp_path / "clipcap.pt"), "--mapper", mapping_type, "--prefix-length", "4",
          *(["--clip-length", "3"] if mapping_type == "transformer" else []),
          "--clip", json.dumps(CLIP), "--tokenizer", str(tokenizer_dir), "-o", str(out)])
    printed = capsys.readouterr().out
    module = CaptionModule.load_from_checkpoint(out, weights_only=True).eval()

    torch.manual_seed(1)
    features = torch.randn(3, CLIP["embed_dim"]) * 5  # raw CLIP embeddings are far from unit norm
    tokens = torch.randint(0, reference.gpt.config.vocab_size, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0  # a padded caption
    # what ClipCap's published models were fed: the raw embedding (MLP) or its L2-normalised form (transformer)
    prefix = features / features.norm(2, -1, keepdim=True) if mapping_type == "transformer" else features
    with torch.no_grad():
        expected = reference(tokens, prefix, torch.cat([torch.ones(3, 4, dtype=torch.long), mask], dim=1)).logits
        batch = {"clip_features": features, "input_ids": tokens, "attention_mask": mask, "labels": tokens.masked_fill(mask == 0, -100)}
        got = module(batch).logits
    assert got.shape == expected.shape == (3, 4 + 7, reference.gpt.config.vocab_size)
    diff = (got - expected).abs().max().item()
    print(f"max |logit difference| {mapping_type} stale={stale}: {diff:.2e}")
    assert diff <= 1e-5
    assert module.hparams.normalize_features == (mapping_type == "transformer")
    assert ("L2-normalises" in printed) == (mapping_type == "transformer")
    report = torch.load(out, weights_only=True)["clipcap_import"]
    assert report["dropped_keys"] == (4 if stale else 0)


def test_mismatched_options_and_files_are_refused(tmp_path, tokenizer_dir):
    clipcap_checkpoint(tmp_path / "mlp.pt", tokenizer_dir, "mlp", stale=True)
    with pytest.raises(ClipCapImportError, match="--prefix-length 10 disagrees.*4"):
        import_clipcap(tmp_path / "mlp.pt", "mlp", CLIP, str(tokenizer_dir), prefix_length=10)
    with pytest.raises(ClipCapImportError, match="--mapper mlp"):
        import_clipcap(tmp_path / "mlp.pt", "transformer", CLIP, str(tokenizer_dir))
    with pytest.raises(ClipCapImportError, match="48-dim CLIP embeddings.*gives 64"):
        import_clipcap(tmp_path / "mlp.pt", "mlp", {**CLIP, "embed_dim": 64}, str(tokenizer_dir))
    state = torch.load(tmp_path / "mlp.pt", weights_only=True)
    torch.save({**state, "clip_model.visual.proj": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ClipCapImportError, match="unexpected key 'clip_model.visual.proj'"):
        import_clipcap(tmp_path / "other.pt", "mlp", CLIP, str(tokenizer_dir))


def test_a_published_name_without_weights_fails_fast(tmp_path, tokenizer_dir, monkeypatch):
    from captioner.models.hub import MissingWeightsError

    monkeypatch.setenv("HOME", str(tmp_path))  # no cached CLIP
    clipcap_checkpoint(tmp_path / "mlp.pt", tokenizer_dir, "mlp", stale=False)
    with pytest.raises(MissingWeightsError, match="ViT-B/32"):
        import_clipcap(tmp_path / "mlp.pt", "mlp", "ViT-B/32", str(tokenizer_dir))


@pytest.mark.slow
@pytest.mark.parametrize("mapping_type,clip_arch,prefix_length", [("mlp", "ViT-B/32", 10), ("transformer", "RN50x4", 40)])
def test_published_sizes_import_with_equal_logits(mapping_type, clip_arch, prefix_length, tmp_path, tokenizer_dir):
    """ClipCap's published shapes: GPT-2 small (12 heads read as n_embd / 64), P = 10 MLP on ViT-B/32,
    P = L = 40 transformer on RN50x4, random weights, stale buffers included."""
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config())
    prefix_size = 512 if clip_arch == "ViT-B/32" else 640
    reference = ClipCaptionModel(gpt, prefix_length, prefix_length, prefix_size, 8, mapping_type).eval()
    state = reference.state_dict()
    for i in range(12):
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1024, 1024, dtype=torch.uint8)).view(1, 1, 1024, 1024)
        state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "clipcap.pt")
    main([str(tmp_path / "clipcap.pt"), "--mapper", mapping_type, "--prefix-length", str(prefix_length),
          "--clip", json.dumps({"arch": clip_arch}), "--tokenizer", str(tokenizer_dir), "-o", str(tmp_path / "out.ckpt")])
    module = CaptionModule.load_from_checkpoint(tmp_path / "out.ckpt", weights_only=True).eval()
    assert module.decoder.config.n_head == 12 and module.encoder.embed_dim == prefix_size
    features, tokens = torch.randn(2, prefix_size) * 5, torch.randint(0, 50257, (2, 12))
    prefix = features / features.norm(2, -1, keepdim=True) if mapping_type == "transformer" else features
    mask = torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        expected = reference(tokens, prefix, torch.ones(2, prefix_length + 12, dtype=torch.long)).logits
        got = module({"clip_features": features, "input_ids": tokens, "attention_mask": mask, "labels": tokens}).logits
    diff = (got - expected).abs().max().item()
    print(f"max |logit difference| {mapping_type} at published size: {diff:.2e}")
    assert diff <= 1e-5
