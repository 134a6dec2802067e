"""Embedded dataset, COCO loading, feature store and noise."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from captioner.data.coco import load_coco
from captioner.data.noise import add_noise
from captioner.data.synthetic import write_dataset
from captioner.models.decoder import load_tokenizer
from captioner.pretraining import build_tokenizer


def test_synthetic_dataset_is_deterministic_coco_format(tmp_path):
    sizes = {"train": 30, "val": 5, "test": 5}
    a = write_dataset(tmp_path / "a", seed=3, sizes=sizes)
    b = write_dataset(tmp_path / "b", seed=3, sizes=sizes)
    for split in sizes:
        ja = json.loads((a / "annotations" / f"captions_{split}.json").read_text())
        jb = json.loads((b / "annotations" / f"captions_{split}.json").read_text())
        assert ja == jb
        records = load_coco(a / "annotations" / f"captions_{split}.json", a / "images" / split)
        assert len(records) == sizes[split] and all(len(r.captions) == 5 and r.path.exists() for r in records)
    for name in ("00000001.png", "00000031.png"):
        split = "train" if name.startswith("00000001") else "val"
        assert (a / "images" / split / name).read_bytes() == (b / "images" / split / name).read_bytes()
    other = write_dataset(tmp_path / "c", seed=4, sizes=sizes)
    assert (other / "annotations" / "captions_train.json").read_text() != (a / "annotations" / "captions_train.json").read_text()


def test_captions_vary_and_tokenizer_round_trips(tmp_path):
    root = write_dataset(tmp_path, seed=0, sizes={"train": 200, "val": 5, "test": 5})
    records = load_coco(root / "annotations" / "captions_train.json", root / "images" / "train")
    distinct = [len(set(r.captions)) for r in records]
    assert sum(distinct) / len(distinct) > 2.5  # five annotators rarely agree word for word
    assert any(" to the left of " in c for r in records for c in r.captions)
    train = {"annotations": str(root / "annotations" / "captions_train.json"), "images": str(root / "images" / "train")}
    tokenizer = load_tokenizer(str(build_tokenizer(tmp_path / "tokenizer", train, vocab_size=512)))
    assert 256 < len(tokenizer) <= 512
    text = records[0].captions[0]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode(text)) < len(text.split()) * 2  # merges cover whole words


def test_a_world_of_ones_own_does_not_write_the_embedded_scenes(tmp_path):
    # data=synthetic with every split given through data.splits.*: the embedded root stays unwritten; the
    # default's splits, under that root, write it
    from conftest import compose_train

    own = write_dataset(tmp_path / "own", seed=3, sizes={"train": 4, "val": 2, "test": 2})
    splits = [f"data.splits.{s}.{k}={own}/{sub}" for s in ("train", "val", "test")
              for k, sub in (("annotations", f"annotations/captions_{s}.json"), ("images", f"images/{s}"))]
    instantiate(compose_train(tmp_path / "run", tmp_path / "data", ["experiment=smoke", *splits]).data).prepare_data()
    assert not (tmp_path / "data" / "synthetic_smoke").exists()
    instantiate(compose_train(tmp_path / "run", tmp_path / "data", ["experiment=smoke"]).data).prepare_data()
    assert (tmp_path / "data" / "synthetic_smoke" / "annotations" / "captions_train.json").is_file()


def test_noise_touches_training_batches_only(smoke_cfg):
    cfg = smoke_cfg("data.noise.variance=0.5", "data.noise.rate=1.0")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))

    class Stage:
        training = False

    datamodule.trainer = Stage()
    assert datamodule.on_after_batch_transfer(batch, 0) is batch  # validation / test: untouched
    Stage.training = True
    noisy = datamodule.on_after_batch_transfer(batch, 0)
    for key in ("clip_features", "patch_tokens"):
        clean = torch.nn.functional.normalize(batch[key], dim=-1)
        assert not torch.allclose(noisy[key], clean, atol=1e-3)
    assert torch.equal(noisy["input_ids"], batch["input_ids"])


@pytest.mark.parametrize("variance,rate", [(0.016, 1.0), (0.04, 0.1)])
def test_noise_statistics_match_the_config(variance, rate):
    x = torch.randn(4000, 512)
    g = torch.Generator().manual_seed(0)
    noisy = add_noise(x, variance, rate, normalize=False, generator=g)
    delta = noisy - x
    touched = delta != 0
    assert abs(touched.float().mean().item() - rate) < 0.01
    assert abs(delta[touched].var().item() - variance) < 0.05 * variance
    assert abs(delta[touched].mean().item()) < 0.01 * variance**0.5 * 10
    assert torch.equal(add_noise(x, 0.0, rate, normalize=False), x)
