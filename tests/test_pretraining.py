"""Pretraining of the tiny CLIP and GPT-2: it teaches them something, and its caches behave."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from captioner.data.coco import ImageRecord, load_records
from captioner.data.synthetic import SHAPES, write_dataset
from captioner.contrastive import retrieval_top1
from captioner.models.encoder import ClipEncoder
from captioner.pretraining import build_clip, build_lm, build_tokenizer, native_resolution
from conftest import CONF

PRETRAIN = OmegaConf.to_container(OmegaConf.load(CONF / "pretrain" / "tiny.yaml"))
ARCH = PRETRAIN["clip"]["arch"]  # the embedded default's CLIP architecture


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("world"), seed=2, sizes={"train": 1500, "val": 300})
    split = lambda s: {"format": "coco", "annotations": str(root / "annotations" / f"captions_{s}.json"),  # noqa: E731
                       "images": str(root / "images" / s)}
    return root, split("train"), split("val")


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):
    _, train, val = world
    out = tmp_path_factory.mktemp("clip") / "clip"
    return build_clip(out, train, ARCH, val=val, steps=250, batch_size=128, lr=1e-3, warmup_steps=25, val_every=None)


def _encode(encoder: ClipEncoder, records) -> dict[str, torch.Tensor]:
    from captioner.data.images import load_image

    pixels = torch.stack([encoder.preprocess(load_image(r.path)) for r in records])
    return encoder(pixels)


def _probe(train_x, train_y, test_x, test_y) -> float:
    """Linear probe: multinomial logistic regression (L-BFGS) on unit-norm features, test accuracy."""
    train_x, test_x = F.normalize(train_x, dim=-1), F.normalize(test_x, dim=-1)
    w = torch.zeros(train_x.shape[1], len(SHAPES), requires_grad=True)
    b = torch.zeros(len(SHAPES), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200)

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(10 * train_x @ w + b, train_y) + 1e-3 * w.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return (10 * test_x @ w + b).argmax(1).eq(test_y).float().mean().item()


def test_pretrained_clip_beats_the_random_one_on_retrieval_and_a_shape_probe(world, pretrained):
    root, train, val = world
    scenes = {s: {im["id"]: im for im in json.loads((root / "annotations" / f"captions_{s}.json").read_text())["images"]}
              for s in ("train", "val")}
    records = {"train": load_records(train), "val": load_records(val)}
    singles = {s: [r for r in records[s] if len(scenes[s][r.image_id]["scene"]) == 1] for s in records}
    labels = {s: torch.tensor([SHAPES.index(scenes[s][r.image_id]["scene"][0]["shape"]) for r in singles[s]]) for s in singles}
    results = {}
    for name, spec in {"random": {**ARCH, "image_resolution": 64}, "pretrained": str(pretrained)}.items():
        encoder = ClipEncoder(spec)
        image = F.normalize(_encode(encoder, records["val"])["clip_features"], dim=-1)
        text = F.normalize(encoder.encode_text([r.captions[0] for r in records["val"]]), dim=-1)
        pooled = {s: _encode(encoder, singles[s])["clip_features"] for s in singles}
        results[name] = (retrieval_top1(image, text), _probe(pooled["train"], labels["train"], pooled["val"], labels["val"]))
    (random_top1, random_probe), (top1, probe) = results["random"], results["pretrained"]
    assert random_top1 < 0.05 and top1 > 0.2, results
    assert probe > random_probe + 0.1, results


def test_the_clip_cache_is_reused_and_rebuilt_when_its_manifest_differs(world, pretrained, tmp_path, monkeypatch, capsys):
    _, train, val = world
    out = tmp_path / "clip"
    shutil.copytree(pretrained.parent, out)
    before = (out / "clip.pt").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("a current cache must not train again")

    monkeypatch.setattr("captioner.contrastive.ContrastiveCLIP.__init__", refuse)
    same = dict(steps=250, batch_size=128, lr=1e-3, warmup_steps=25, val_every=None)
    assert build_clip(out, train, ARCH, val=val, **same) == out / "clip.pt"
    assert (out / "clip.pt").read_bytes() == before
    monkeypatch.undo()
    build_clip(out, train, ARCH, **{**same, "steps": 2})
    assert "built with other settings (steps: 250 -> 2)" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["steps"] == 2
    assert (out / "clip.pt").read_bytes() != before


def test_auto_resolution_is_the_training_images_own_size_within_the_cap(world, pretrained, tmp_path):
    _, train, _ = world
    assert ARCH["image_resolution"] == "auto"
    assert json.loads((pretrained.parent / "manifest.json").read_text())["arch"]["image_resolution"] == 64  # the number: the
    assert ClipEncoder(str(pretrained)).resolution == 64  # embedded default's cache key is what it was before "auto"
    assert native_resolution(load_records(train), 16, 96) == 64

    def drawn(name: str, size: tuple[int, int], count: int = 5) -> list[ImageRecord]:
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("RGB", size).save(tmp_path / name / f"{i}.png")
        return [ImageRecord(i, tmp_path / name / f"{i}.png", ("a caption",)) for i in range(count)]

    assert native_resolution(drawn("held_out", (96, 96)), 16, 96) == 96
    assert native_resolution(drawn("odd", (100, 70)), 16, 128) == 96  # the longer side, to the nearest even patch count
    assert native_resolution(drawn("five_patches", (80, 80)), 16, 128) == 64  # 5 x 5 is no grid of 2 x 2 blocks
    assert native_resolution(drawn("seven_patches", (112, 112)), 16, 128) == 128
    assert native_resolution(drawn("photos", (640, 480)), 16, 96) == 96  # the cap bounds the cost
    assert native_resolution(drawn("thumbs", (20, 20)), 16, 96) == 32  # at least a 2 x 2 grid
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="image_resolution=auto: none of 1 training images could be read.*as a number"):
        native_resolution([ImageRecord(0, tmp_path / "broken.png", ("a caption",))], 16, 96)


def test_tokenizer_and_language_model_are_cached_the_same_way(world, tmp_path, monkeypatch, capsys):
    from captioner.models.decoder import load_decoder, load_tokenizer

    _, train, val = world
    tokenizer_dir = build_tokenizer(tmp_path / "tokenizer", train, vocab_size=300)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    arch = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 48}
    out = build_lm(tmp_path / "gpt2", train, tokenizer_dir, arch, val=val, steps=30, batch_size=32, lr=3e-3, warmup_steps=3, val_every=None)
    losses = [float(r.split(",")[1]) for r in (out / "logs" / "metrics.csv").read_text().splitlines()[1:] if r.split(",")[1]]
    assert losses[-1] < losses[0] * 0.9, losses  # it learns the captions' language
    model = load_decoder(str(out), tokenizer)
    assert model.config.vocab_size == len(tokenizer) and model.config.n_layer == 1

    monkeypatch.setattr("captioner.caption_lm.CaptionLM.__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert build_lm(tmp_path / "gpt2", train, tokenizer_dir, arch, val=val, steps=30, batch_size=32, lr=3e-3, warmup_steps=3, val_every=None) == out
    assert build_tokenizer(tmp_path / "tokenizer", train, vocab_size=300) == tokenizer_dir
    monkeypatch.undo()
    build_tokenizer(tmp_path / "tokenizer", train, vocab_size=280)
    assert "the tokenizer" in capsys.readouterr().out
    assert json.loads((tokenizer_dir / "manifest.json").read_text())["vocab_size"] == 280


def test_a_language_model_text_is_captions_of_one_image_each_ended_by_end_of_text(world):
    from captioner.data.pairs import CaptionTexts

    class Words:  # one id per word, end-of-text 0: the texts read back as words
        eos_token_id = 0

        def __init__(self):
            self.vocab: dict[str, int] = {}

        def encode(self, caption: str, add_special_tokens: bool = True) -> list[int]:  # no special tokens either way
            return [self.vocab.setdefault(w, len(self.vocab) + 1) for w in caption.split()]

    records = load_records(world[1])[:3]
    words = Words()
    single, double = CaptionTexts(records, words, 40), CaptionTexts(records, words, 40, captions_per_text=2)
    assert len(single) == len(double) == sum(len(r.captions) for r in records)
    names = {i: w for w, i in words.vocab.items()} | {0: "|"}
    read = lambda item: " ".join(names[t] for t in item["input_ids"])  # noqa: E731
    first = records[0].captions
    assert read(single[0]) == f"| {first[0]} |"
    assert read(double[0]) == f"| {first[0]} | {first[1]} |"
    assert read(double[len(first) - 1]) == f"| {first[-1]} | {first[0]} |"  # cyclic within the image
    assert all(item["image_id"] == records[0].image_id for item in double.items[: len(first)])
    with pytest.raises(ValueError, match="captions_per_text"):
        CaptionTexts(records, words, 40, captions_per_text=0)


def test_the_pretrained_encoder_is_frozen_in_the_captioner(pretrained, world, tmp_path):
    from captioner.module import CaptionModule

    _, train, _ = world
    tokenizer = build_tokenizer(tmp_path / "tokenizer", train, vocab_size=300)
    module = CaptionModule(encoder=str(pretrained), decoder={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 48},
                           tokenizer=str(tokenizer), mapper={"name": "attention", "num_layers": 1, "num_heads": 2}, prefix_length=4)
    saved = torch.load(pretrained, weights_only=True)
    # the file's weights, not random ones (clip.model.build_model stores them in fp16, as OpenAI's releases are)
    assert torch.equal(module.encoder.visual.conv1.weight, saved["visual.conv1.weight"].half().float())
    module.train()
    batch = {"pixels": torch.randn(2, 3, 64, 64), "input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "labels": torch.tensor([[5, 6, 7], [8, 9, -100]])}
    module(batch).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in module.encoder.parameters())
    assert any(p.grad is not None for p in module.mapper.parameters())
    assert not module.encoder.training


def test_other_coco_format_data_pretrains_on_its_own_training_split(tmp_path, data_dir):
    """Another world through plain overrides of data.splits.*: tokenizer, CLIP and GPT-2 are built from it."""
    from captioner.data.pairs import pairs_hash
    from captioner.train import run
    from conftest import compose_train

    other = write_dataset(tmp_path / "other", seed=11, sizes={"train": 48, "val": 8, "test": 8})
    splits = [f"data.splits.{s}.{k}={other / ('annotations/captions_' + s + '.json' if k == 'annotations' else 'images/' + s)}"
              for s in ("train", "val", "test") for k in ("annotations", "images")]
    cfg = compose_train(tmp_path / "run", data_dir, ["experiment=smoke", f"data.cache_dir={tmp_path / 'cache'}", *splits])
    run(cfg)
    train = load_records({"annotations": str(other / "annotations" / "captions_train.json"), "images": str(other / "images" / "train")})
    for step in ("tokenizer", "clip", "gpt2"):
        manifest = json.loads((tmp_path / "cache" / "pretrained" / step / "manifest.json").read_text())
        assert manifest["data"] == pairs_hash(train), step
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert scores["scene"]["images"] == 8
