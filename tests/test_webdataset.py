"""data=webdataset: img2dataset-style tar shards, built here from coco_mini, stream into the feature store
bit for bit as the same images in COCO format; a kill resumes without a duplicate or missing key; ranks
split the shards; fsspec URLs read like paths; training reads the store."""

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

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds

from captioner.data import shards
from captioner.data.coco import load_coco
from captioner.data.extraction import BadImagesError, open_or_extract
from captioner.data.features import FeatureStore
from captioner.data.manifest import StaleStoreError
from captioner.models.encoder import ClipEncoder
from conftest import ROOT, SHARED_DATA, compose_train

TINY_CLIP = {  # clip.model.CLIP arguments: the real ViT at toy size
    "embed_dim": 32, "image_resolution": 32, "vision_layers": 1, "vision_width": 64, "vision_patch_size": 8,
    "context_length": 8, "vocab_size": 49408, "transformer_width": 32, "transformer_heads": 2, "transformer_layers": 1,
}
BATCH = 10  # shards of 40 images: COCO-format extraction's batches of 10 hold the same images


@pytest.fixture(scope="module")
def coco_val(coco_mini):
    """coco_mini's 159 val2017 photos in COCO format, records sorted by image id."""
    return load_coco(coco_mini / "annotations" / "captions_val2017_subset159.json", coco_mini / "images" / "val2017")


def write_shards(records, folder: Path, per_shard: int, caption_file: str = "json") -> str:
    """img2dataset's layout: {key}.jpg, {key}.txt and {key}.json per sample, 9-digit numeric keys."""
    folder.mkdir(parents=True, exist_ok=True)
    count = -(-len(records) // per_shard)
    for s in range(count):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as tar:
            for r in records[s * per_shard : (s + 1) * per_shard]:
                sample = {"__key__": f"{r.image_id:09d}", "jpg": r.path.read_bytes()}
                if caption_file == "json":  # several references: `captions`; img2dataset writes one `caption`
                    sample["json"] = json.dumps({"caption": r.captions[0], "captions": list(r.captions), "status": "success"}).encode()
                else:
                    sample["txt"] = r.captions[0].encode()
                tar.write(sample)
    return str(folder / f"{{00000..{count - 1:05d}}}.tar")


def extract(directory: Path, pattern, **options):
    options = {"batch_size": BATCH, "dtype": "fp32", "tokens": True, **options}
    return shards.open_or_extract(directory, pattern, partial(ClipEncoder, TINY_CLIP), TINY_CLIP, "val", **options)


def arrays(store: FeatureStore) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {i: (np.asarray(store.clip_features[r]), np.asarray(store.patch_tokens[r])) for i, r in store.row.items()}


def test_shards_give_the_coco_format_features_bit_for_bit_key_by_key(coco_val, tmp_path):
    pattern = write_shards(coco_val, tmp_path / "shards", per_shard=40)
    assert len(shards.expand(pattern)) == 4
    records, store = extract(tmp_path / "wds", pattern)
    coco = open_or_extract(tmp_path / "coco", coco_val, partial(ClipEncoder, TINY_CLIP), TINY_CLIP, "val",
                                        dtype="fp32", tokens=True, batch_size=BATCH)
    ours, theirs = arrays(store), arrays(coco)
    assert sorted(ours) == sorted(theirs) and len(ours) == 159
    for image_id, (features, tokens) in theirs.items():
        assert np.array_equal(ours[image_id][0], features) and np.array_equal(ours[image_id][1], tokens)
    assert not np.array_equal(ours[coco_val[0].image_id][0], ours[coco_val[1].image_id][0])  # images differ
    assert {r.image_id: r.captions for r in records} == {r.image_id: r.captions for r in coco_val}  # all 5 references
    manifest = store.manifest
    assert manifest["shards"] == shards.expand(pattern) and manifest["shard_counts"] == [40, 40, 40, 39]
    assert manifest["keys"][:2] == [f"{coco_val[0].image_id:09d}", f"{coco_val[1].image_id:09d}"]
    assert not (tmp_path / "wds" / "parts").exists()


def test_ranks_split_the_shards_and_an_fsspec_url_reads_like_a_path(coco_val, tmp_path):
    records = coco_val[:60]
    pattern = write_shards(records, tmp_path / "shards", per_shard=12, caption_file="txt")
    _, single = extract(tmp_path / "single", pattern)
    barrier = threading.Barrier(2)
    seen = {}

    class Counting(ClipEncoder):
        def forward(self, pixels):
            seen[self.rank] = seen.get(self.rank, 0) + len(pixels)
            return super().forward(pixels)

    encoders = [Counting(TINY_CLIP), Counting(TINY_CLIP)]  # built here: threads would share the seeded RNG
    for r, encoder in enumerate(encoders):
        encoder.rank = r

    def rank(r: int) -> None:
        shards.open_or_extract(tmp_path / "two", pattern, lambda: encoders[r], TINY_CLIP, "val", batch_size=BATCH,
                               dtype="fp32", rank=r, world_size=2, barrier=barrier.wait)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {0: 36, 1: 24}  # shards 0, 2, 4 and 1, 3: each image encoded once, by its shard's rank
    two = FeatureStore(tmp_path / "two")
    assert two.manifest == single.manifest
    for name in ("clip_features", "patch_tokens"):
        assert np.array_equal(np.load(tmp_path / "two" / f"{name}.npy"), np.load(tmp_path / "single" / f"{name}.npy"))

    memory = fsspec.filesystem("memory")
    for url in shards.expand(pattern):
        memory.pipe(f"/wds/{Path(url).name}", Path(url).read_bytes())
    remote, remote_store = extract(tmp_path / "remote", "memory://wds/{00000..00004}.tar")
    assert remote_store.manifest["shard_counts"] == single.manifest["shard_counts"] == [12] * 5
    assert np.array_equal(np.load(tmp_path / "remote" / "clip_features.npy"), np.load(tmp_path / "single" / "clip_features.npy"))
    assert [r.captions for r in remote] == [(r.captions[0],) for r in records]  # .txt: one reference each


KILLABLE = """
import sys, time
from functools import partial
from captioner.data import shards
from captioner.models.encoder import ClipEncoder
import json

class SlowEncoder(ClipEncoder):  # stands in for a long GPU extraction: leaves time to kill it mid-way
    def forward(self, pixels):
        time.sleep(0.2)
        return super().forward(pixels)

spec = json.loads(sys.argv[1])
shards.open_or_extract(sys.argv[3], sys.argv[2], partial(SlowEncoder, spec), spec, "val", batch_size=4, dtype="fp16")
"""


def test_sigkill_mid_shard_resumes_with_no_duplicate_or_missing_key(coco_val, tmp_path):
    records = coco_val[:48]
    pattern = write_shards(records, tmp_path / "shards", per_shard=8)
    store = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same kernels as this process
    killed = subprocess.Popen([sys.executable, "-c", KILLABLE, json.dumps(TINY_CLIP), pattern, str(store)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    # wait until two shards are done and a third is half written, then kill
    while killed.poll() is None and time.monotonic() < deadline:
        if (store / "parts" / "000001").is_dir() and list((store / "parts").glob("*.tmp/clip_features-000000.npy")):
            break
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    assert not (store / "manifest.json").exists() and list((store / "parts").glob("*.tmp"))
    done_before = sorted(p.name for p in (store / "parts").iterdir() if p.is_dir() and not p.name.endswith(".tmp"))
    assert 2 <= len(done_before) < 6

    encoded = []

    class Counting(ClipEncoder):
        def forward(self, pixels):
            encoded.append(len(pixels))
            return super().forward(pixels)

    resumed, resumed_store = shards.open_or_extract(store, pattern, partial(Counting, TINY_CLIP), TINY_CLIP, "val", batch_size=4, dtype="fp16")
    assert sum(encoded) == 8 * (6 - len(done_before))  # finished shards are not read again
    keys = resumed_store.manifest["keys"]
    assert len(keys) == len(set(keys)) == 48 and sorted(int(k) for k in keys) == sorted(r.image_id for r in records)
    _, fresh = shards.open_or_extract(tmp_path / "fresh", pattern, partial(ClipEncoder, TINY_CLIP), TINY_CLIP, "val", batch_size=4, dtype="fp16")
    assert resumed_store.manifest == fresh.manifest
    for name in ("clip_features", "patch_tokens"):
        assert np.array_equal(np.load(store / f"{name}.npy"), np.load(tmp_path / "fresh" / f"{name}.npy"))

    with pytest.raises(StaleStoreError, match="dtype"):  # a complete store with other settings is refused
        shards.open_or_extract(store, pattern, partial(ClipEncoder, TINY_CLIP), TINY_CLIP, "val", dtype="fp32")


def test_unusable_samples_stop_with_their_names_or_are_skipped_and_counted(coco_val, tmp_path):
    pattern = write_shards(coco_val[:16], tmp_path / "shards", per_shard=8)
    with wds.TarWriter(str(tmp_path / "shards" / "00002.tar")) as tar:
        tar.write({"__key__": "broken", "jpg": b"not a jpeg", "txt": b"a caption"})
        tar.write({"__key__": "silent", "jpg": coco_val[20].path.read_bytes()})
        tar.write({"__key__": "fine", "jpg": coco_val[21].path.read_bytes(), "txt": b"a photo"})
    pattern = pattern.replace("00001}", "00002}")
    with pytest.raises(BadImagesError) as stopped:
        extract(tmp_path / "store", pattern)
    assert "00002.tar#broken: image broken.jpg cannot be decoded" in str(stopped.value) and "#silent: no caption" in str(stopped.value)
    assert sorted(p.name for p in (tmp_path / "store" / "parts").iterdir()) == ["000000", "000001", "000002.bad.json", "settings.json"]
    records, store = extract(tmp_path / "store", pattern, bad_images="skip")
    assert len(store) == 17 and store.manifest["shard_counts"] == [8, 8, 1]
    assert [s.split("#")[1] for s in store.manifest["skipped_samples"]] == ["broken", "silent"]
    fine = next(r for r in records if r.path.name.endswith("#fine"))
    assert fine.captions == ("a photo",) and fine.image_id == shards.image_id("fine") > 0


def test_a_training_run_reads_the_shards(coco_val, tmp_path, data_dir):
    from captioner.train import run

    train = write_shards(coco_val[:64], tmp_path / "train", per_shard=16)
    val = write_shards(coco_val[64:96], tmp_path / "val", per_shard=16)
    cfg = compose_train(tmp_path / "run", data_dir, [
        "data=webdataset", "model=clipcap", "~pretrain", f"model.tokenizer={SHARED_DATA / 'gpt2_tokenizer'}",
        "model.encoder={" + ", ".join(f"{k}: {v}" for k, v in TINY_CLIP.items()) + "}", "model.prefix_length=4",
        "model.decoder={n_layer: 1, n_embd: 64, n_head: 2, n_positions: 64}", "model.mapper.num_layers=1", "model.mapper.num_heads=2",
        f"data.splits.train.shards='{train}'", f"data.splits.val.shards='{val}'", f"data.cache_dir={tmp_path / 'features'}",
        "data.num_workers=0", "data.batch_size=16", "trainer.max_epochs=1", "+trainer.limit_train_batches=4", "model.val_cider_images=8",
        "logger=csv", "score_meteor=false", "test_decoding={strategy: greedy, max_new_tokens: 8}",
    ])
    metrics = run(cfg)
    assert metrics["train/loss"] > 0 and "val/cider" in metrics and "test/CIDEr" in metrics
    stores = sorted(p.name.split("-")[0] for p in (tmp_path / "features").iterdir() if not p.name.startswith("."))  # not locks
    assert stores == ["test", "train", "val"]
    train_store = FeatureStore(next((tmp_path / "features").glob("train-*")))
    assert train_store.manifest["shard_counts"] == [16] * 4 and len(train_store) == 64
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    captions = json.loads((tmp_path / "run" / "captions_test.json").read_text())
    assert sorted(c["image_id"] for c in captions) == sorted(r.image_id for r in coco_val[64:96])


@pytest.mark.parametrize("quoting", ["'{}'", "\"'{}'\""], ids=["shell-quoted", "hydra-quoted"])
def test_a_shard_pattern_override_composes_as_a_shell_passes_it(quoting):
    """`shards='s3://.../{00000..00999}.tar'` typed in a shell reaches Hydra unquoted, where `{` opens a
    dict: the entry points quote a brace range back, so both the README's quoting and Hydra's own work."""
    pattern = "s3://bucket/pairs/{00000..00999}.tar"
    line = (f"{sys.executable} -m captioner.extract experiment=coco_attn data=webdataset "
            f"data.splits.train.shards={quoting.format(pattern)} --cfg job -p data.splits.train.shards")
    done = subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == pattern
    assert len(shards.expand(done.stdout.strip())) == 1000
