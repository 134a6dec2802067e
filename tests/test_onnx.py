"""ONNX export and the ONNX Runtime engine: the same captions as PyTorch fp32, through the API and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from captioner.api import Captioner
from captioner.caption import main as caption_main
from captioner.checkpoint import load_module
from captioner.export import export as export_model
from conftest import scenes


@pytest.fixture(scope="module")
def onnx_export(distinct_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "export"
    export_model(distinct_ckpt, out, onnx=True)
    return out


@pytest.fixture(scope="module")
def small_export(embedded_ckpt, tmp_path_factory):
    """The embedded default's seconds-long smoke checkpoint, exported with its graphs (for the logits check)."""
    out = tmp_path_factory.mktemp("onnx_small") / "export"
    export_model(embedded_ckpt, out, onnx=True)
    return out


@pytest.fixture(scope="module")
def images(distinct_ckpt, data_dir):
    """The trained model's test split and five scenes it must tell apart: 21 images."""
    from captioner.data.images import load_image

    paths = sorted((data_dir / "synthetic_distinct" / "images" / "test").glob("*.png"))  # conftest's DISTINCT data
    assert paths, f"no test images under {data_dir}"
    return [load_image(p) for p in paths] + scenes("large red circle", "large blue square left", "small yellow triangle top",
                                                   "row of three", "green above red")


def test_the_graphs_give_pytorchs_logits_through_prefill_and_steps(small_export):
    module = load_module(small_export)
    engine = Captioner.from_pretrained(small_export, engine="onnx").module
    from transformers import DynamicCache

    pixels = torch.randn(3, 3, module.encoder.resolution, module.encoder.resolution)
    with torch.no_grad():
        features = module.features({"pixels": pixels})
        torch.testing.assert_close(engine.features({"pixels": pixels}), features, atol=1e-4, rtol=1e-4)
        prefix = module.mapper(features)
        torch.testing.assert_close(engine.mapper(features), prefix, atol=1e-4, rtol=1e-4)
        torch_cache, ort_cache = DynamicCache(), DynamicCache()
        expected = module.decoder(inputs_embeds=prefix, cache=torch_cache, use_cache=True).logits[:, -1]
        got = engine.decoder(inputs_embeds=prefix, cache=ort_cache, use_cache=True).logits[:, -1]
        for step in range(4):  # each step's position and past length differ from the traced example's
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"step {step}")
            tokens = expected.argmax(-1)
            expected = module.decoder(input_ids=tokens[:, None], cache=torch_cache, use_cache=True).logits[:, -1]
            got = engine.decoder(input_ids=tokens[:, None], cache=ort_cache, use_cache=True).logits[:, -1]
    assert ort_cache.get_seq_length() == torch_cache.get_seq_length() == prefix.shape[1] + 4


@pytest.mark.parametrize("decoding", [{"strategy": "greedy"}, {"strategy": "beam", "num_beams": 3}], ids=["greedy", "beam3"])
def test_onnx_runtime_captions_equal_pytorch_fp32(onnx_export, images, decoding):
    exact = Captioner.from_pretrained(onnx_export, prepacked=False).caption(images, max_new_tokens=20, **decoding)
    onnx = Captioner.from_pretrained(onnx_export, engine="onnx").caption(images, max_new_tokens=20, **decoding)
    same = sum(a == b for a, b in zip(exact, onnx))
    assert same >= 0.99 * len(images), [(a, b) for a, b in zip(exact, onnx) if a != b]
    assert len(set(exact)) > 1  # the captions follow the images: equality is not one repeated string


def test_the_cli_captions_with_onnx_runtime(onnx_export, images, tmp_path):
    paths = []
    for i, image in enumerate(images[-3:]):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    out = tmp_path / "captions.jsonl"
    assert caption_main(["--ckpt", str(onnx_export), "--engine", "onnx", "--max-new-tokens", "12", "-o", str(out), *map(str, paths)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = Captioner.from_pretrained(onnx_export).caption(images[-3:], max_new_tokens=12)
    assert [r["caption"] for r in rows] == expected


def test_what_does_not_export_says_so(small_export, tmp_path):
    with pytest.raises(ValueError, match="engine 'hf'"):
        Captioner.from_pretrained(small_export, engine="onnx").caption(scenes("large red circle")[0], engine="hf")
    with pytest.raises(ValueError, match="drop int8"):
        Captioner.from_pretrained(small_export, engine="onnx", int8=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(FileNotFoundError, match="onnx=true"):
        Captioner.from_pretrained(plain, engine="onnx")
