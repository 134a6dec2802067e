"""The feature store: one encode per image, paired by id, resumable after SIGKILL, refused when stale,
bad images stop or skip without losing work, shards merge to the single-process result, and
training reads it memory-mapped in length-bucketed, batch-padded batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data.coco import ImageRecord, load_image, load_karpathy
from captioner.data.datamodule import CaptionDataModule, collate
from captioner.data.features import BadImagesError, FeatureStore, StaleStoreError
from captioner.models.encoder import ClipEncoder
from conftest import ROOT
from test_coco import GRAYSCALE_ID, karpathy_file

TINY_CLIP = {  # clip.model.CLIP arguments: the real ViT at toy size
    "embed_dim": 32, "image_resolution": 32, "vision_layers": 1, "vision_width": 64, "vision_patch_size": 8,
    "context_length": 8, "vocab_size": 100, "transformer_width": 32, "transformer_heads": 2, "transformer_layers": 1,
}


def make_images(folder: Path, count: int, size: int = 24, first_id: int = 1) -> list[ImageRecord]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(first_id)
    records = []
    for k in range(count):
        path = folder / f"{first_id + k:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(first_id + k, path, (f"picture {first_id + k}",)))
    return records


def extract(directory: Path, records, spec=TINY_CLIP, encoder_factory=None, **options) -> FeatureStore:
    options = {"batch_size": 4, "dtype": "fp32", "tokens": True, **options}
    return FeatureStore.open_or_extract(directory, records, encoder_factory or partial(ClipEncoder, spec), spec, "train", **options)


class CountingEncoder(ClipEncoder):
    """Counts the images it encodes, to prove work is not repeated."""

    encoded = 0

    def forward(self, pixels):
        CountingEncoder.encoded += len(pixels)
        return super().forward(pixels)


def test_a_captions_features_are_its_own_images_and_grayscale_is_rgb(coco_mini, tmp_path):
    spec = {**TINY_CLIP, "image_resolution": 64}
    module = CaptionDataModule(
        splits={"test": {"format": "karpathy", "file": str(karpathy_file(coco_mini)), "images": str(coco_mini / "images"), "split": "test"}},
        encoder=spec, tokenizer=str(ROOT.parent / "shared" / "data" / "gpt2_tokenizer"), cache_dir=str(tmp_path),
        feature_dtype="fp32", extract_batch_size=16,
    )
    records, store = module.load_split("test")
    assert len(records) == len(store) == 80 and GRAYSCALE_ID in store.row
    encoder = ClipEncoder(spec)
    check = [r for r in records if r.image_id == GRAYSCALE_ID] + records[::9]
    pixels = torch.stack([encoder.preprocess(load_image(r.path)) for r in check])
    assert pixels.shape[1] == 3  # the grayscale photo enters CLIP as three channels
    direct = encoder(pixels)  # one batch of other images than extraction's: matches to float tolerance
    for k, r in enumerate(check):
        for key in ("clip_features", "patch_tokens"):
            assert torch.allclose(store.features(r.image_id)[key], direct[key][k], atol=1e-4)
        others = [o for o in check if o.image_id != r.image_id]
        assert all(not torch.allclose(store.features(o.image_id)["clip_features"], direct["clip_features"][k], atol=1e-2) for o in others)


KILLABLE = """
import json, sys, time
from functools import partial
from captioner.data.coco import load_records
from captioner.data.features import FeatureStore
from captioner.models.encoder import ClipEncoder

class SlowEncoder(ClipEncoder):  # stands in for a long GPU extraction: leaves time to kill it mid-way
    def forward(self, pixels):
        time.sleep(0.05)
        return super().forward(pixels)

spec, records = json.loads(sys.argv[1]), load_records(json.loads(sys.argv[2]))
FeatureStore.open_or_extract(sys.argv[3], records, partial(SlowEncoder, spec), spec, "train", batch_size=4, dtype="fp16")
"""


def test_sigkill_resume_equals_an_uninterrupted_run_and_a_complete_store_is_left_alone(tmp_path):
    records = make_images(tmp_path / "images", 64)
    (tmp_path / "captions.csv").write_text("file,caption\n" + "".join(f"{r.path.name},{r.captions[0]}\n" for r in records))
    source = {"format": "custom", "file": str(tmp_path / "captions.csv"), "images": str(tmp_path / "images")}
    store = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same kernels as this process
    killed = subprocess.Popen([sys.executable, "-c", KILLABLE, json.dumps(TINY_CLIP), json.dumps(source), str(store)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows, deadline = 0, time.monotonic() + 120
    while rows < 8 and killed.poll() is None and time.monotonic() < deadline:
        progress = store / "progress.json"
        rows = json.loads(progress.read_text())["rows"] if progress.exists() else 0
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    done_before = json.loads((store / "progress.json").read_text())["rows"]
    assert not (store / "manifest.json").exists() and 8 <= done_before < 64

    from captioner.data.coco import load_records

    records = load_records(source)
    CountingEncoder.encoded = 0
    resumed = extract(store, records, encoder_factory=partial(CountingEncoder, TINY_CLIP), dtype="fp16")
    assert CountingEncoder.encoded <= 64 - done_before + 4  # at most the batch the kill interrupted again
    whole = extract(tmp_path / "whole", records, dtype="fp16")
    for name in ("clip_features", "patch_tokens"):
        a, b = np.load(store / f"{name}.npy"), np.load(tmp_path / "whole" / f"{name}.npy")
        assert a.shape[0] == 64 and np.abs(a.astype(np.float32)).sum() > 0 and np.array_equal(a, b)
    assert resumed.manifest == whole.manifest
    assert sorted(p.name for p in store.iterdir()) == ["clip_features.npy", "manifest.json", "patch_tokens.npy"]

    before = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    CountingEncoder.encoded = 0
    extract(store, records, encoder_factory=partial(CountingEncoder, TINY_CLIP), dtype="fp16")
    assert CountingEncoder.encoded == 0
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == before  # a complete store: nothing written

    with pytest.raises(StaleStoreError, match=r"dtype \(stored 'fp16' vs wanted 'fp32'\)") as refused:
        extract(store, records, dtype="fp32")
    assert "encoder" not in str(refused.value) and "Delete the directory" in str(refused.value)
    with pytest.raises(StaleStoreError, match=r"encoder \(stored .*'vision_layers': 1.* vs wanted .*'vision_layers': 2"):
        extract(store, records, spec={**TINY_CLIP, "vision_layers": 2}, dtype="fp16")
    with pytest.raises(StaleStoreError, match="image_ids"):
        extract(store, records[:-1], dtype="fp16")
