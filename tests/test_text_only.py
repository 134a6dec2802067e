"""Text-only training (CapDec): the mapper learns from caption embeddings and is scored on images."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from captioner.data.text import TextCaptionDataModule
from captioner.metrics import report
from captioner.models.encoder import ClipEncoder
from captioner.results import load_references
from captioner.train import run
from conftest import compose_train

SMALL = ["experiment=[smoke,text_only]"]  # smoke's sizes, text_only's data and noise


@pytest.fixture(scope="module")
def text_root(tmp_path_factory):
    """Its own embedded dataset, so the feature cache shows exactly what a text-only run makes."""
    return tmp_path_factory.mktemp("text_only")


def logged_losses(run_dir: Path) -> list[float]:
    """train/loss at every step of a run logged with trainer.log_every_n_steps=1 (its CSV log)."""
    log = pd.read_csv(next(run_dir.rglob("metrics.csv")))
    return log["train/loss"].dropna().tolist()


def learnt(losses: list[float]) -> bool:
    """The mean loss of the last quarter of the steps is below the first quarter's."""
    quarter = max(1, len(losses) // 4)
    return len(losses) >= 8 and sum(losses[-quarter:]) / quarter < sum(losses[:quarter]) / quarter


def test_text_only_run_trains_on_captions_and_scores_test_images(text_root, tmp_path):
    cfg = compose_train(tmp_path / "run", text_root, [*SMALL, "trainer.log_every_n_steps=1"])
    assert cfg.data._target_ == "captioner.data.text.TextCaptionDataModule" and cfg.model.mapper.name == "mlp"
    run(cfg)
    assert learnt(logged_losses(tmp_path / "run")), logged_losses(tmp_path / "run")
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    captions = json.loads((tmp_path / "run" / "captions_test.json").read_text())
    references = load_references(text_root / "synthetic_smoke" / "annotations" / "captions_test.json")
    rescored = report(references, {c["image_id"]: c["caption"] for c in captions}, meteor=False)
    assert scores["model"] == pytest.approx(rescored.model) and scores["human"] == pytest.approx(rescored.human)
    test_ids = {im["id"] for im in json.loads(next((text_root / "synthetic_smoke" / "annotations").glob("captions_test.json")).read_text())["images"]}
    assert {c["image_id"] for c in captions} == test_ids  # one caption per test *image*
    features = (text_root / "synthetic_smoke" / "features").iterdir()
    stores = sorted(p.name.rsplit("-", 1)[0] for p in features if not p.name.startswith(("pretrained", ".")))
    assert stores == ["test", "train-text", "val"]  # the captioner's training never encoded a training image
    text_store = next((text_root / "synthetic_smoke" / "features").glob("train-text-*"))
    assert json.loads((text_store / "manifest.json").read_text())["count"] == 64 * 5


def test_training_items_are_the_captions_own_clip_text_embeddings(text_root, tmp_path):
    cfg = compose_train(tmp_path / "run", text_root, SMALL)
    datamodule: TextCaptionDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    encoder = ClipEncoder(cfg.data.encoder)
    train = datamodule.datasets["train"]
    for i in (0, 1, 7, len(train) - 1):
        r, k = train.pairs[i]
        caption = train.records[r].captions[k]
        item = train[i]
        assert datamodule.tokenizer.decode(item["input_ids"][:-1]) == caption
        expected = encoder.encode_text([caption])[0]
        assert torch.allclose(item["clip_features"], expected, atol=2e-3 * expected.abs().max().item())
    assert not torch.allclose(train[0]["clip_features"], train[1]["clip_features"])  # five captions, five embeddings
    val = datamodule.datasets["val"][0]
    image = datamodule.datasets["val"].store.features(val["image_id"])["clip_features"]
    assert torch.equal(val["clip_features"], image)  # validation reads the image


def test_the_store_is_made_once_and_reused(text_root, tmp_path, monkeypatch):
    cfg = compose_train(tmp_path / "run", text_root, SMALL)
    first = instantiate(cfg.data)
    first.prepare_data()
    first.setup("fit")
    monkeypatch.setattr(ClipEncoder, "encode_text", lambda *a, **k: pytest.fail("captions were encoded again"))
    again = instantiate(cfg.data)
    again.setup("fit")
    assert torch.equal(again.datasets["train"][3]["clip_features"], first.datasets["train"][3]["clip_features"])
    records = first.records["train"]
    other = instantiate(compose_train(tmp_path / "run", text_root, [*SMALL, "model.encoder=ViT-B/32"]).data)
    assert first._store_key(records) == again._store_key(records)
    assert other._store_key(records) != first._store_key(records)  # another CLIP: a store of its own, not a stale one


def test_patch_token_mappers_are_refused_with_the_fix(text_root, tmp_path):
    cfg = compose_train(tmp_path / "run", text_root, [*SMALL, "model/mapper=attention"])
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.trainer = SimpleNamespace(lightning_module=instantiate(cfg.model), world_size=1)
    with pytest.raises(ValueError, match="model/mapper=mlp or model/mapper=transformer"):
        datamodule.setup("fit")


def test_the_transformer_mapper_trains_text_only_too(text_root, tmp_path):
    run(compose_train(tmp_path / "run", text_root, [*SMALL, "model/mapper=transformer", "score=false", "trainer.log_every_n_steps=1"]))
    assert learnt(logged_losses(tmp_path / "run")), logged_losses(tmp_path / "run")
