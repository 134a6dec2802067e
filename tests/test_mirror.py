"""Mirrored training twins: side words swapped, only captions that name a side, one of each pair per epoch,
and the twin's features are the encoder's on the flipped image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import ImageOps

from captioner.data.coco import ImageRecord
from captioner.data.datamodule import CaptionDataModule
from captioner.data.dataset import pairs_for
from captioner.data.images import load_image
from captioner.data.mirror import SIDES, SideWords, mirror_records, mirrored_id, twin_pairs
from captioner.data.sampler import training_sampler
from captioner.models.towers import build_encoder


def test_side_words_swap_whole_words_in_any_case_and_a_swap_must_map_back():
    words = SideWords(SIDES)
    assert words.mirrored("a ring in the top Left and a star at the RIGHT of a leftover") == \
        "a ring in the top Right and a star at the LEFT of a leftover"
    assert words.names_a_side("upper-left") and not words.names_a_side("a leftover wrighting")
    with pytest.raises(ValueError, match="data.mirror_swap"):
        SideWords({"left": "right"})  # right would stay right: the mirrored caption would be wrong


def test_only_captions_that_name_a_side_get_a_twin_and_each_epoch_reads_one_of_each_pair():
    records = [ImageRecord(1, Path("a.png"), ("a ring on the left", "a ring", "on the left a ring")),
               ImageRecord(0, Path("b.png"), ("a ring, a star and a cross in a row",))]  # a row implies an order: no twin
    twins = mirror_records(records, SideWords(SIDES))
    assert twins == [ImageRecord(mirrored_id(1), Path("a.png"), ("a ring on the right", "on the right a ring"), mirrored=True)]
    assert mirrored_id(0) == -1 and mirrored_id(1) == -2  # never a real (non-negative) image id
    records += twins
    pairs = pairs_for(records, every_caption=True)
    twin = twin_pairs(records, pairs, SideWords(SIDES))
    assert twin == [4, -1, 5, -1]  # pair (0, 0) -> (2, 0), (0, 2) -> (2, 1)
    assert pairs_for(records, every_caption=False) == [(0, 0), (1, 0)]  # captioning a split skips the twins

    size, twins_of = 2000, [2000 + i if i % 2 == 0 else -1 for i in range(2000)]
    sampler = training_sampler([1] * 4000, seed=0, batch_size=10, twins=twins_of)
    seen = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == size
        base = sorted(i - 2000 if i >= 2000 else i for i in order)
        assert base == list(range(size))  # every item once, as itself or as its twin
        mirrored = [i for i in order if i >= 2000]
        assert all(twins_of[i - 2000] == i for i in mirrored)
        assert 0.45 < len(mirrored) / 1000 < 0.55  # half of the items that have a twin
        seen.append(order)
    assert seen[0] != seen[1]
    sampler.set_epoch(0)
    assert list(sampler) == seen[0]  # a pure function of (seed, epoch): a resumed run reads the same
    plain = training_sampler([1] * 2000, seed=0, batch_size=10)
    assert list(plain) == torch.randperm(2000, generator=torch.Generator().manual_seed(0)).tolist()  # no twins: as before


def test_a_twin_is_the_encoder_on_the_flipped_image_and_the_epoch_keeps_its_steps(smoke_cfg):
    cfg = smoke_cfg("data.mirror=true")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    twins = [r for r in dataset.records if r.mirrored]
    plain = datamodule.records["train"]
    assert twins and len(plain) + len(twins) == len(dataset.records) and not any(r.mirrored for r in plain)
    assert len(datamodule.train_dataloader().sampler) == sum(len(r.captions) for r in plain)  # steps as without twins

    record = twins[0]
    encoder = build_encoder(cfg.data.encoder, "fp32")
    image = load_image(record.path)
    with torch.no_grad():
        flipped = encoder(encoder.preprocess(ImageOps.mirror(image)).unsqueeze(0))
        unflipped = encoder(encoder.preprocess(image).unsqueeze(0))
    stored = dataset.store.features(record.image_id)
    original = dataset.store.features(-record.image_id - 1)
    for key in ("clip_features", "patch_tokens"):
        np.testing.assert_allclose(stored[key].float().numpy(), flipped[key][0].numpy(), atol=2e-3, rtol=0)
        assert not torch.allclose(original[key].float(), stored[key].float(), atol=1e-2)
        np.testing.assert_allclose(original[key].float().numpy(), unflipped[key][0].numpy(), atol=2e-3, rtol=0)
    words = SideWords(SIDES)
    source = next(r for r in plain if r.image_id == -record.image_id - 1)
    assert list(record.captions) == [words.mirrored(c) for c in source.captions if words.names_a_side(c)]


def test_mirroring_is_off_by_default_and_refused_for_webdataset_shards(smoke_cfg, tmp_path):
    cfg = smoke_cfg()
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert not any(r.mirrored for r in datamodule.datasets["train"].records) and datamodule.twins is None

    shards = CaptionDataModule(splits={"train": {"format": "webdataset", "shards": str(tmp_path / "train-{000..001}.tar")}},
                               encoder="ViT-B/32", tokenizer="gpt2", cache_dir=str(tmp_path), mirror=True)
    with pytest.raises(ValueError, match="data.mirror=false"):
        shards.load_split("train")
