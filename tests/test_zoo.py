"""Every published CLIP and GPT-2 builds at full size: shapes and parameter counts of the real models.

The default run builds them on the `meta` device (shapes without memory: a second for all of them);
the `slow` test builds each with real random weights and runs one forward.
"""

from __future__ import annotations

import clip
import pytest
import torch

from captioner.models.decoder import load_decoder, load_tokenizer
from captioner.pretraining import train_tokenizer
from captioner.models.encoder import ClipEncoder, load_clip

# name: (parameters of the whole CLIP as OpenAI publishes it, of its image tower, E, token width, tokens, resolution)
CLIP_MODELS = {
    "RN50": (102_007_137, 38_316_896, 1024, 2048, 49, 224),
    "RN101": (119_688_033, 56_259_936, 512, 2048, 49, 224),
    "RN50x4": (178_300_601, 87_137_080, 640, 2560, 81, 288),
    "ViT-B/32": (151_277_313, 87_849_216, 512, 512, 49, 224),
    "ViT-B/16": (149_620_737, 86_192_640, 512, 512, 196, 224),
    "ViT-L/14": (427_616_513, 303_966_208, 768, 768, 256, 224),
}
# name: (parameters as Hugging Face counts them, lm_head tied to wte; width; layers)
GPT2_MODELS = {
    "gpt2": (124_439_808, 768, 12),
    "gpt2-medium": (354_823_168, 1024, 24),
    "gpt2-large": (774_030_080, 1280, 36),
    "gpt2-xl": (1_557_611_200, 1600, 48),
    "distilgpt2": (81_912_576, 768, 6),
}
SMALL_VIT = {"embed_dim": 48, "image_resolution": 32, "vision_layers": 2, "vision_width": 64, "vision_patch_size": 8,
             "context_length": 16, "vocab_size": 49408, "transformer_width": 32, "transformer_heads": 2, "transformer_layers": 1}
SMALL_RN = {**SMALL_VIT, "image_resolution": 64, "vision_layers": [1, 1, 1, 1], "vision_width": 16, "vision_patch_size": None}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(["a red circle above a small blue square"] * 10, out, vocab_size=280)
    return load_tokenizer(str(out))


@pytest.mark.parametrize("name", CLIP_MODELS)
def test_every_clip_builds_at_full_size(name):
    total, visual, embed_dim, token_dim, num_tokens, resolution = CLIP_MODELS[name]
    with torch.device("meta"):
        encoder = ClipEncoder({"arch": name})
        out = encoder(torch.empty(2, 3, encoder.resolution, encoder.resolution))
    assert count(encoder.visual) == visual
    assert count(encoder) + 1 == total  # CLIP's logit_scale is the one weight not kept
    assert (encoder.embed_dim, encoder.token_dim, encoder.num_tokens, encoder.resolution) == (embed_dim, token_dim, num_tokens, resolution)
    assert out["clip_features"].shape == (2, embed_dim)
    assert out["patch_tokens"].shape == (2, num_tokens, token_dim)


@pytest.mark.parametrize("name", GPT2_MODELS)
def test_every_gpt2_builds_at_full_size(name, tokenizer):
    params, width, layers = GPT2_MODELS[name]
    with torch.device("meta"):
        model = load_decoder({"arch": name}, tokenizer)
        logits = model(input_ids=torch.zeros(2, 5, dtype=torch.long)).logits
    assert count(model) == params
    assert (model.config.n_embd, model.config.n_layer, model.config.vocab_size) == (width, layers, 50257)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert logits.shape == (2, 5, 50257)


def test_arch_fields_can_be_overridden_and_unknown_names_are_refused(tokenizer):
    with torch.device("meta"):
        model = load_decoder({"arch": "gpt2-medium", "n_layer": 2}, tokenizer)
        encoder = ClipEncoder({"arch": "ViT-B/16", "vision_layers": 1})
    assert (model.config.n_embd, model.config.n_layer) == (1024, 2)
    assert len(encoder.visual.transformer.resblocks) == 1 and encoder.num_tokens == 196
    with pytest.raises(ValueError, match="unknown architecture 'ViT-H/14'.*ViT-B/32"):
        ClipEncoder({"arch": "ViT-H/14"})
    with pytest.raises(ValueError, match="model.encoder_precision"):
        ClipEncoder(SMALL_VIT, precision="fp8")


@pytest.mark.parametrize("spec", [SMALL_VIT, SMALL_RN], ids=["vit", "resnet"])
def test_features_are_clips_own_encodings_in_every_precision(spec):
    reference = load_clip(spec, seed=0).eval()
    pixels = torch.randn(2, 3, spec["image_resolution"], spec["image_resolution"])
    texts = ["a red circle", "two small blue squares"]
    with torch.no_grad():
        image = reference.encode_image(pixels)
        text = reference.encode_text(clip.tokenize(texts, context_length=spec["context_length"]))
    for precision, tolerance in (("fp32", 1e-5), ("fp16", 2e-2), ("bf16", 1e-1)):
        encoder = ClipEncoder(spec, precision=precision, seed=0)
        out = encoder(pixels)
        scale = image.abs().max()
        assert (out["clip_features"] - image).abs().max() <= tolerance * scale, precision
        assert (encoder.encode_text(texts) - text).abs().max() <= tolerance * text.abs().max(), precision
        assert out["clip_features"].dtype == torch.float32
        low = torch.float32 if precision == "fp32" else {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        assert encoder.visual.conv1.weight.dtype == low
    grid = spec["image_resolution"] // (32 if spec is SMALL_RN else spec["vision_patch_size"])
    assert out["patch_tokens"].shape == (2, grid * grid, encoder.token_dim)
    if spec is SMALL_RN:  # the grid before attention pooling: its mean is the pooling's query token
        assert encoder.token_dim == spec["vision_width"] * 32


@pytest.mark.slow
@pytest.mark.parametrize("name", CLIP_MODELS)
def test_full_size_clip_forward(name):
    encoder = ClipEncoder({"arch": name})
    out = encoder(torch.randn(1, 3, encoder.resolution, encoder.resolution))
    assert torch.isfinite(out["clip_features"]).all() and out["clip_features"].shape == (1, CLIP_MODELS[name][2])
    assert out["patch_tokens"].shape == (1, CLIP_MODELS[name][4], CLIP_MODELS[name][3])
    assert torch.isfinite(encoder.encode_text(["a photo of a dog"])).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", GPT2_MODELS)
def test_full_size_gpt2_forward(name, tokenizer):
    model = load_decoder({"arch": name}, tokenizer).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 50257, (1, 8))).logits
    assert count(model) == GPT2_MODELS[name][0]
    assert logits.shape == (1, 8, 50257) and torch.isfinite(logits).all()


def test_random_clip_is_a_function_of_its_spec_not_of_the_run_seed(smoke_cfg):
    from hydra.utils import instantiate

    cfg = smoke_cfg("seed=5")
    instantiate(cfg.data).prepare_data()
    module = instantiate(cfg.model)
    store_encoder = ClipEncoder(cfg.data.encoder, cfg.data.precision)  # what the feature store extracts with
    pixels = torch.randn(2, 3, store_encoder.resolution, store_encoder.resolution)
    assert torch.equal(module.encoder(pixels)["clip_features"], store_encoder(pixels)["clip_features"])
    other = ClipEncoder({**SMALL_VIT, "seed": 3})
    assert not torch.equal(other.visual.proj, ClipEncoder(SMALL_VIT).visual.proj)


def test_local_files_load_clip_and_gpt2(tmp_path, tokenizer):
    spec = {**SMALL_VIT, "transformer_width": 64, "transformer_heads": 1}  # clip.build_model infers 64-wide heads
    torch.save(load_clip(spec).state_dict(), tmp_path / "clip.pt")
    from_file, built = ClipEncoder(str(tmp_path / "clip.pt")), ClipEncoder(spec)
    pixels = torch.randn(1, 3, 32, 32)
    # clip.load stores weights in fp16: the file's model is the built one to fp16 precision
    assert torch.allclose(from_file(pixels)["clip_features"], built(pixels)["clip_features"], atol=2e-2)
    assert (from_file.embed_dim, from_file.num_tokens) == (48, 16)
    model = load_decoder({"n_layer": 1, "n_embd": 32, "n_head": 2}, tokenizer)
    model.save_pretrained(tmp_path / "gpt2")
    again = load_decoder(str(tmp_path / "gpt2"), tokenizer)
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)
