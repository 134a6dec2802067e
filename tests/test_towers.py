"""Vision towers from open_clip and transformers: each equals its library's own forward, reads the layer it is
asked for, counts exactly the patch grid (SigLIP has no class token), and refuses what it cannot do in one line."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from captioner.data.features import encoder_digest
from captioner.models.tower import NoTextTowerError
from captioner.models.towers import build_encoder
from towers_saved import PATCH, SIZE, open_clip_siglip_config, open_clip_vit_config, save_open_clip, save_transformers

GRID = (SIZE // PATCH) ** 2
TOWERS = ("open_clip_vit", "open_clip_siglip", "transformers_clip", "transformers_siglip")


@pytest.fixture(scope="session")
def towers(tmp_path_factory) -> dict[str, dict]:
    """Each tiny tower saved once per session, as a user has it; its spec."""
    root = tmp_path_factory.mktemp("towers")
    return {
        "open_clip_vit": save_open_clip(root / "open_clip_vit", open_clip_vit_config()),
        "open_clip_siglip": save_open_clip(root / "open_clip_siglip", open_clip_siglip_config(root / "open_clip_siglip")),
        "transformers_clip": save_transformers(root / "transformers_clip", "clip"),
        "transformers_siglip": save_transformers(root / "transformers_siglip", "siglip"),
        "transformers_clip_vision": save_transformers(root / "transformers_clip_vision", "clip", vision_only=True),
    }


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(45, 60, 3, generator=g) * 255).to(torch.uint8).numpy())


def _reference(kind: str, spec: dict, pixels: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled embedding, the block's output tokens) from the library alone: a fresh model, its own forward."""
    if kind.startswith("open_clip"):
        import open_clip
        from open_clip.model import CLIP, CustomTextCLIP

        cfg = dict(spec["config"])
        model = (CustomTextCLIP if cfg.pop("custom_text", False) else CLIP)(**cfg).eval()
        open_clip.load_checkpoint(model, spec["checkpoint"])
        blocks = model.visual.trunk.blocks if hasattr(model.visual, "trunk") else model.visual.transformer.resblocks
        seen = []
        hook = blocks[block].register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            pooled = model.encode_image(pixels, normalize=False)
        hook.remove()
        tokens = seen[0] if seen[0].shape[0] == pixels.shape[0] else seen[0].transpose(0, 1)  # (B, L, W)
        return pooled, tokens
    from transformers import AutoModel

    model = AutoModel.from_pretrained(spec["path"]).eval()
    with torch.no_grad():
        pooled = model.get_image_features(pixel_values=pixels).pooler_output
        hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[block + 1]
    return pooled, hidden


@pytest.mark.parametrize("layer", [-1, 0])
@pytest.mark.parametrize("kind", TOWERS)
def test_each_tower_equals_its_library_on_the_same_pixels(kind, layer, towers):
    tower = build_encoder({**towers[kind], "layer": layer})
    pixels = torch.stack([tower.preprocess(_image(s)) for s in range(3)])
    assert pixels.shape == (3, 3, SIZE, SIZE)
    out = tower(pixels)
    pooled, hidden = _reference(kind, towers[kind], pixels, layer % 2)
    # the grid exactly: a CLIP ViT's sequence is its class token and the grid, SigLIP's the grid alone
    prefix = 0 if "siglip" in kind else 1
    assert hidden.shape[1] == GRID + prefix
    assert tower.num_tokens == GRID and out["patch_tokens"].shape == (3, GRID, tower.token_dim)
    assert out["clip_features"].shape == (3, tower.embed_dim)
    torch.testing.assert_close(out["clip_features"], pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["patch_tokens"], hidden[:, prefix:], atol=1e-5, rtol=0)


def test_layers_differ_and_a_layer_beyond_the_tower_is_one_line(towers):
    pixels = build_encoder(towers["transformers_siglip"]).preprocess(_image(0))[None]
    first, last = (build_encoder({**towers["transformers_siglip"], "layer": k})(pixels)["patch_tokens"] for k in (0, -1))
    assert not torch.allclose(first, last)
    with pytest.raises(ValueError, match=r"model.encoder.layer=5: this tower has 2 blocks"):
        build_encoder({**towers["open_clip_siglip"], "layer": 5})


@pytest.mark.parametrize("kind", TOWERS)
def test_each_tower_embeds_text_in_its_image_space(kind, towers):
    tower = build_encoder(towers[kind])
    texts = tower.encode_text(["a red circle", "a blue square on the left", "a dog"])
    assert texts.shape == (3, tower.embed_dim) and torch.isfinite(texts).all()
    assert not torch.allclose(texts[0], texts[1])


def test_a_tower_without_a_text_part_refuses_text_in_one_line(tmp_path):
    tower = build_encoder(save_transformers(tmp_path / "vision", "siglip", vision_only=True))
    assert tower.num_tokens == GRID
    with pytest.raises(NoTextTowerError) as refused:
        tower.encode_text(["a red circle"])
    assert "SiglipVisionModel" in str(refused.value) and "no text tower" in str(refused.value) and "\n" not in str(refused.value)


def test_the_siglip_processor_squashes_and_clip_crops(towers):
    """Each tower preprocesses as its own processor: SigLIP resizes to the square, CLIP resizes and crops."""
    wide = Image.new("RGB", (64, 32), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 16, 32))  # the left quarter white: a crop cuts it, a squash keeps it
    siglip = build_encoder(towers["transformers_siglip"]).preprocess(wide)
    clip = build_encoder(towers["transformers_clip"]).preprocess(wide)
    assert siglip[:, :, 0].mean() > 0.9 and clip[:, :, 0].mean() < 0  # SigLIP: mean/std 0.5 -> white is 1


@pytest.mark.parametrize("kind", ["open_clip_vit", "transformers_clip"])
def test_an_absent_weight_file_is_one_clear_line(kind, towers, tmp_path):
    spec = dict(towers[kind])
    key = "checkpoint" if kind.startswith("open_clip") else "path"
    spec[key] = str(tmp_path / "gone")
    with pytest.raises(FileNotFoundError) as refused:
        build_encoder(spec)
    message = str(refused.value)
    assert f"model.encoder.{key}" in message and str(tmp_path / "gone") in message and "\n" not in message


def test_a_checkpoint_of_another_shape_is_refused(towers, tmp_path):
    spec = {**towers["open_clip_vit"], "checkpoint": towers["open_clip_siglip"]["checkpoint"]}
    with pytest.raises(ValueError, match="does not hold"):
        build_encoder(spec)


def test_the_store_key_changes_when_the_weights_change(towers, tmp_path):
    """A feature store records the tower's files: rewritten weights at the same path are another store."""
    spec = save_transformers(tmp_path / "t", "clip", seed=1)
    before = encoder_digest(spec)
    save_transformers(tmp_path / "t", "clip", seed=2)
    assert before and encoder_digest(spec) != before
    assert json.dumps(spec)  # the spec itself is plain JSON: the manifest stores it whole


def test_the_siglip_model_config_names_an_open_clip_tower_and_its_file(tmp_path):
    from omegaconf import OmegaConf

    from conftest import compose_train

    cfg = compose_train(tmp_path, tmp_path, ["experiment=coco_attn", "model=siglip", f"model.encoder.checkpoint={tmp_path / 'nope.bin'}"])
    spec = OmegaConf.to_container(cfg.model.encoder)
    assert spec["source"] == "open_clip" and spec["name"] == "ViT-B-16-SigLIP" and spec["layer"] == -1
    with pytest.raises(FileNotFoundError, match="model.encoder.checkpoint: checkpoint file .*nope.bin does not exist"):
        build_encoder(spec)


def test_onnx_export_refuses_a_tower_whose_preprocessing_it_would_not_reproduce(towers):
    from types import SimpleNamespace

    from captioner.onnx_graphs import unsupported

    refused = unsupported(SimpleNamespace(encoder=build_encoder(towers["transformers_siglip"])))
    assert refused and "transformers tower" in refused and "preprocesses images as OpenAI's CLIP" in refused


def test_the_model_card_and_the_page_name_a_tower_by_its_weights(towers):
    from captioner.model_card import _spec
    from captioner.web.identity import _name

    card = _spec({**towers["open_clip_vit"], "layer": -2})
    assert "open_clip" in card and towers["open_clip_vit"]["checkpoint"] in card and "layer -2" in card and "random" not in card
    assert _name(towers["transformers_clip"]) == "transformers_clip"


def test_a_spec_straight_from_the_config_builds_the_same_tower(towers):
    """Hydra hands the spec over as a DictConfig; open_clip's constructors test for dict."""
    from omegaconf import OmegaConf

    tower = build_encoder(OmegaConf.create(towers["open_clip_siglip"]))
    pixels = tower.preprocess(_image(1))[None]
    torch.testing.assert_close(tower(pixels)["clip_features"], build_encoder(towers["open_clip_siglip"])(pixels)["clip_features"])


def test_a_hub_tokenizer_out_of_reach_is_one_line_and_a_saved_one_embeds(tmp_path):
    """open_clip's SigLIP reads captions with an HF tokenizer: offline and uncached it refuses text in one line
    naming the fix; `tokenizer: DIR` (a saved tokenizer) embeds."""
    from towers_saved import _tokenizer

    config = open_clip_siglip_config(tmp_path)
    config["text_cfg"]["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP"
    tower = build_encoder({"source": "open_clip", "config": config})
    with pytest.raises(NoTextTowerError, match=r"model.encoder.tokenizer=DIR") as refused:
        tower.encode_text(["a red circle"])
    assert "\n" not in str(refused.value)
    _tokenizer(tmp_path / "tokenizer")
    tower = build_encoder({"source": "open_clip", "config": config, "tokenizer": str(tmp_path / "tokenizer")})
    assert tower.encode_text(["a red circle", "a dog"]).shape == (2, tower.embed_dim)
