"""OpenAI CLIP's patch tokens from a chosen block (`model.encoder: {name: FILE, layer: 0}` or `layer:` beside the
sizes of a random build): they equal clip's own blocks run by hand, the last block is the default, and a spec that
names a file keeps every check a plain file name gets (the TorchScript refusal, the export carrying it)."""

from __future__ import annotations

import json

import pytest
import torch
from clip.model import CLIP, build_model

from captioner.checkpoint import UnsafeCheckpointError, load_module
from captioner.export import export
from captioner.models.encoder import clip_name, renamed
from captioner.models.towers import build_encoder, random_tower, weight_files
from test_export import trained  # noqa: F401 - a module-scoped fixture: a smoke run's last.ckpt

ARCH = {"embed_dim": 32, "image_resolution": 32, "vision_layers": 3, "vision_width": 64, "vision_patch_size": 8,
        "context_length": 16, "vocab_size": 49408, "transformer_width": 64, "transformer_heads": 1, "transformer_layers": 1}


def _reference(model: CLIP, pixels: torch.Tensor, block: int) -> torch.Tensor:
    """Block `block`'s patch tokens through ln_post and the projection, from clip's own modules."""
    v = model.visual
    x = v.conv1(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x).permute(1, 0, 2)
    for blk in v.transformer.resblocks[: block + 1]:
        x = blk(x)
    return (v.ln_post(x.permute(1, 0, 2)) @ v.proj)[:, 1:]


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_a_chosen_blocks_tokens_equal_clips_own_blocks(layer, tmp_path):
    torch.manual_seed(0)
    torch.save(CLIP(**ARCH).state_dict(), tmp_path / "clip.pt")
    model = build_model(torch.load(tmp_path / "clip.pt", weights_only=True)).float().eval()  # clip's loader (fp16-rounded)
    tower = build_encoder({"name": str(tmp_path / "clip.pt"), "layer": layer})
    pixels = torch.randn(2, 3, 32, 32)
    out = tower(pixels)
    with torch.no_grad():
        expected = _reference(model, pixels, layer % 3)
        torch.testing.assert_close(out["patch_tokens"], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(out["clip_features"], model.encode_image(pixels), rtol=0, atol=1e-5)  # pooled: always the last block
    assert out["patch_tokens"].shape[1] == tower.num_tokens == 16  # a 4 x 4 grid, no class token
    if layer == -1:  # the default spec reads the same tokens, bit for bit
        assert torch.equal(out["patch_tokens"], build_encoder(str(tmp_path / "clip.pt"))(pixels)["patch_tokens"])


def test_layer_beside_random_sizes_and_a_wrong_layer_is_one_line():
    first, last = (build_encoder({**ARCH, "layer": k})(torch.zeros(1, 3, 32, 32))["patch_tokens"] for k in (0, -1))
    assert not torch.allclose(first, last)
    with pytest.raises(ValueError, match=r"model.encoder.layer=3: this tower has 3 blocks"):
        build_encoder({**ARCH, "layer": 3})
    with pytest.raises(ValueError, match=r"a named CLIP takes `name` and `layer` only, not \['vision_layers'\]"):
        build_encoder({"name": "clip.pt", "vision_layers": 2})


def test_a_named_spec_is_a_file_for_stores_exports_and_size_checks(tmp_path):
    torch.save(CLIP(**ARCH).state_dict(), tmp_path / "clip.pt")
    spec = {"name": str(tmp_path / "clip.pt"), "layer": 0}
    assert clip_name(spec) == str(tmp_path / "clip.pt") and renamed(spec, "x.pt") == {"name": "x.pt", "layer": 0}
    assert weight_files(spec) == [tmp_path / "clip.pt"]  # the feature store hashes it
    assert not random_tower(spec) and random_tower({**ARCH, "layer": 0})


def test_an_export_carries_a_named_clip_with_its_layer_and_a_torchscript_one_is_refused(trained, tmp_path, monkeypatch):  # noqa: F811
    checkpoint = torch.load(trained[0], map_location="cpu", weights_only=True)
    original = checkpoint["hyper_parameters"]["encoder"]  # the smoke run's pretrained tiny clip.pt
    checkpoint["hyper_parameters"]["encoder"] = {"name": original, "layer": 0}  # same weights, an earlier block read
    torch.save(checkpoint, tmp_path / "layer0.ckpt")
    assert load_module(tmp_path / "layer0.ckpt").model.encoder.layer == 0
    assert load_module(tmp_path / "layer0.ckpt", encoder=original).model.encoder.layer == 0  # encoder=FILE keeps the trained block
    exported = export(tmp_path / "layer0.ckpt", tmp_path / "export")
    config = json.loads((exported / "config.json").read_text())
    assert config["hyper_parameters"]["encoder"] == {"name": "clip.pt", "layer": 0}  # carried, the path made its own
    assert load_module(exported).model.encoder.layer == 0

    scripted = tmp_path / "encoder.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    config["hyper_parameters"]["encoder"] = {"name": str(scripted), "layer": 0}
    (exported / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    with pytest.raises(UnsafeCheckpointError, match=r"names the encoder .*encoder.pt, a TorchScript file"):
        load_module(exported)
