"""The Python API: paths, PIL images and tensors caption alike; decoding options reach the decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import api
from captioner.api import Captioner
from conftest import scenes


@pytest.fixture(scope="module")
def captioner(distinct_ckpt) -> Captioner:
    return Captioner.from_pretrained(distinct_ckpt)


def test_paths_pil_and_tensors_give_the_same_caption(captioner, tmp_path):
    image, row = scenes("large red circle", "row of three")
    path = tmp_path / "scene.png"
    image.save(path)
    as_tensor = lambda im: torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # noqa: E731 - (3, H, W) uint8
    tensor = as_tensor(image)

    from_path, other = captioner.caption(path), captioner.caption(row)
    assert isinstance(from_path, str) and from_path
    assert other != from_path  # a model that ignored the image would pass what follows
    assert captioner.caption(image) == from_path
    assert captioner.caption(tensor) == from_path
    assert captioner.caption(tensor.float() / 255) == from_path
    assert captioner.caption([path, row, image, tensor]) == [from_path, other, from_path, from_path]
    assert captioner.caption(torch.stack([tensor, as_tensor(row)])) == [from_path, other]  # (B, C, H, W)


def test_a_batch_equals_one_image_at_a_time(captioner):
    images = scenes("large red circle", "row of three", "large blue square left", "green above red", "small yellow triangle top")
    one_by_one = [captioner.caption(image) for image in images]
    assert len(set(one_by_one)) == len(images), one_by_one  # each image its own caption
    assert captioner.caption(images, batch_size=2) == one_by_one


def test_decoding_options_reach_the_decoder(captioner, monkeypatch):
    image = Image.new("RGB", (64, 64), (40, 170, 60))
    short = captioner.caption(image, max_new_tokens=2)
    assert len(short.split()) <= 2  # two tokens: two words at most
    seen = []
    from captioner.models import caption_model

    decode = caption_model.generate

    def spy(decoder, tokenizer, prefix, decoding):  # the real decoder, recording what it was asked and wrote
        texts = decode(decoder, tokenizer, prefix, decoding)
        seen.append((decoding, texts))
        return texts

    monkeypatch.setattr(caption_model, "generate", spy)  # where the model core decodes
    beam = captioner.caption(image, strategy="beam", num_beams=3, length_penalty=0.5)
    [(decoding, texts)] = seen
    assert (decoding.strategy, decoding.num_beams, decoding.length_penalty) == ("beam", 3, 0.5)
    assert [beam] == list(texts)  # the caption is the one beam search wrote
    with pytest.raises(ValueError, match="use at most 56"):  # smoke GPT-2: 64 positions, prefix 8
        captioner.caption(image, max_new_tokens=60)
    with pytest.raises(ValueError, match="unknown decoding option"):
        captioner.caption(image, beams=3)
    with pytest.raises(ValueError, match="not one of greedy, beam, sample"):
        captioner.caption(image, strategy="nucleus")


def test_attention_maps_cover_the_patch_grid(captioner):
    [result] = captioner.describe([Image.new("RGB", (80, 60), (235, 210, 30))])
    module = captioner.module
    g = int(module.encoder.num_tokens**0.5)
    assert result.attention.shape == (module.hparams.prefix_length, g, g)
    torch.testing.assert_close(result.attention.sum(dim=(1, 2)), torch.ones(module.hparams.prefix_length))
    assert result.text == captioner.caption(Image.new("RGB", (80, 60), (235, 210, 30)))  # same caption with or without maps


def test_bad_inputs_name_the_problem(captioner, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        captioner.caption(tmp_path / "missing.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    with pytest.raises(ValueError, match="cannot be decoded"):
        captioner.caption(broken)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        captioner.caption(torch.zeros(5, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        captioner.caption(torch.full((3, 8, 8), 3.0))
    with pytest.raises(ValueError, match="too elongated"):
        captioner.caption(Image.new("RGB", (5000, 10)))
    with pytest.raises(TypeError, match="path, a PIL image"):
        captioner.caption([42])
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        Captioner.from_pretrained(tmp_path / "nothing.ckpt")


def test_modes_are_normalised_like_files(captioner, tmp_path):
    rgb = Image.new("RGB", (64, 64), (128, 128, 128))
    expected = captioner.caption(rgb)
    assert captioner.caption(rgb.convert("L")) == expected  # grey stays grey
    rgba = Image.new("RGBA", (64, 64), (128, 128, 128, 255))
    assert captioner.caption(rgba) == expected
    path = tmp_path / "grey16.png"
    Image.new("I;16", (64, 64), 128 * 256).save(path)
    assert captioner.caption(path) == expected


def test_bf16_runs_clip_and_gpt2_in_16_bits_and_stays_close_to_fp32(captioner, distinct_ckpt):
    half = Captioner.from_pretrained(distinct_ckpt, precision="bf16")
    module = half.module
    assert module.encoder.visual.conv1.weight.dtype == torch.bfloat16 and module.encoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in module.decoder.parameters())
    assert all(p.dtype == torch.float32 for p in module.mapper.parameters())  # small: kept exact
    images = [Image.new("RGB", (64, 64), colour) for colour in [(200, 30, 30), (30, 200, 30), (30, 30, 200), (230, 230, 230)]]
    pixels = captioner.pixels(images)
    with torch.inference_mode():
        exact, reduced = captioner.module.features({"pixels": pixels}), module.features({"pixels": pixels})
    assert reduced.dtype == torch.float32 and (reduced - exact).abs().max() < 0.05  # unit-norm features
    # a model trained for seconds has long tails of near-tied tokens that may flip in bf16: the start agrees
    assert [c.split()[:2] for c in half.caption(images)] == [c.split()[:2] for c in captioner.caption(images)]
