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

from captioner.data.coco import ImageRecord, load_karpathy
from captioner.data.images import load_image
from captioner.data.datamodule import CaptionDataModule
from captioner.data.dataset import collate
from captioner.data.extraction import BadImagesError, open_or_extract
from captioner.data.features import FeatureStore
from captioner.data.manifest import StaleStoreError
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
    return open_or_extract(directory, records, encoder_factory or partial(ClipEncoder, spec), spec, "train", **options)


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
from captioner.data.extraction import open_or_extract
from captioner.models.encoder import ClipEncoder

class SlowEncoder(ClipEncoder):  # stands in for a long GPU extraction: leaves time to kill it mid-way
    def forward(self, pixels):
        time.sleep(0.05)
        return super().forward(pixels)

spec, records = json.loads(sys.argv[1]), load_records(json.loads(sys.argv[2]))
open_or_extract(sys.argv[3], records, partial(SlowEncoder, spec), spec, "train", batch_size=4, dtype="fp16")
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


SIDE_BY_SIDE = KILLABLE.replace("time.sleep(0.05)", "time.sleep(0.02); print(len(pixels), flush=True)")


def test_two_runs_on_one_store_side_by_side_encode_it_once(tmp_path):
    """Two jobs of a local sweep open the same missing store at once: one writes it, the other waits and reads it."""
    records = make_images(tmp_path / "images", 64)
    (tmp_path / "captions.csv").write_text("file,caption\n" + "".join(f"{r.path.name},{r.captions[0]}\n" for r in records))
    source = {"format": "custom", "file": str(tmp_path / "captions.csv"), "images": str(tmp_path / "images")}
    args = [sys.executable, "-c", SIDE_BY_SIDE, json.dumps(TINY_CLIP), json.dumps(source), str(tmp_path / "shared")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-2000:] for _, err in done]
    encoded = sorted(sum(int(n) for n in out.split()) for out, _ in done)
    assert encoded == [0, 64], encoded  # one encoded every image once, the other none

    from captioner.data.coco import load_records

    whole = extract(tmp_path / "whole", load_records(source), dtype="fp16")
    for name in ("clip_features", "patch_tokens"):
        assert np.array_equal(np.load(tmp_path / "shared" / f"{name}.npy"), np.load(whole.directory / f"{name}.npy"))


def test_bad_images_stop_with_their_list_then_skip_without_reencoding(tmp_path):
    records = make_images(tmp_path / "images", 20)
    records[5].path.unlink()  # missing
    records[13].path.write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt
    CountingEncoder.encoded = 0
    counting = partial(CountingEncoder, TINY_CLIP)
    with pytest.raises(BadImagesError) as stopped:
        extract(tmp_path / "store", records, encoder_factory=counting)
    message = str(stopped.value)
    assert "2 of 20 images" in message and "00006.png" in message and "00014.png" in message
    assert "data.bad_images=skip" in message and "00001.png" not in message
    assert CountingEncoder.encoded == 18 and json.loads((tmp_path / "store" / "progress.json").read_text())["rows"] == 18

    store = extract(tmp_path / "store", records, encoder_factory=counting, bad_images="skip")
    assert CountingEncoder.encoded == 18  # the 18 good images were not encoded again
    assert store.skipped == {6, 14} and len(store) == 18 and 6 not in store.row
    clean = extract(tmp_path / "clean", [r for r in records if r.image_id not in (6, 14)])
    for r in records:
        if r.image_id not in (6, 14):
            assert torch.equal(store.features(r.image_id)["patch_tokens"], clean.features(r.image_id)["patch_tokens"])


def test_a_replaced_bad_file_is_the_only_one_encoded_again(tmp_path):
    records = make_images(tmp_path / "images", 12)
    good = records[7].path.read_bytes()
    records[7].path.write_bytes(b"not an image")
    CountingEncoder.encoded = 0
    counting = partial(CountingEncoder, TINY_CLIP)
    with pytest.raises(BadImagesError, match="00008.png"):
        extract(tmp_path / "store", records, encoder_factory=counting)
    records[7].path.write_bytes(good)
    store = extract(tmp_path / "store", records, encoder_factory=counting)
    assert CountingEncoder.encoded == 12 and not store.skipped
    assert torch.equal(store.features(8)["clip_features"], extract(tmp_path / "fresh", records).features(8)["clip_features"])


def test_shards_of_two_processes_merge_into_the_single_process_store(tmp_path):
    records = make_images(tmp_path / "images", 23)  # 6 batches of 4, the last one short
    single = extract(tmp_path / "single", records)
    barrier, errors = threading.Barrier(2), []
    encoders = [ClipEncoder(TINY_CLIP) for _ in range(2)]  # built here: seeded init draws from the global RNG

    def rank(r: int) -> None:
        try:
            extract(tmp_path / "sharded", records, encoder_factory=lambda: encoders[r], rank=r, world_size=2, barrier=barrier.wait)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    sharded = FeatureStore(tmp_path / "sharded")
    assert sharded.manifest == single.manifest and not (tmp_path / "sharded" / "shards").exists()
    for name in ("clip_features", "patch_tokens"):
        assert np.array_equal(np.load(tmp_path / "sharded" / f"{name}.npy"), np.load(tmp_path / "single" / f"{name}.npy"))


def test_reading_every_row_keeps_the_mapping_out_of_resident_memory(tmp_path):
    rows, width = 2048, 16384  # 128 MiB of fp32 rows
    (tmp_path / "manifest.json").write_text(json.dumps({"image_ids": list(range(rows)), "patch_tokens": False}))
    array = np.lib.format.open_memmap(tmp_path / "clip_features.npy", mode="w+", dtype=np.float32, shape=(rows, width))
    array[:] = np.arange(rows, dtype=np.float32)[:, None]
    array.flush()
    del array
    store = FeatureStore(tmp_path)

    def mapped_kib() -> int:  # resident pages of mapped files in this process
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssFile:")))

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    start = mapped_kib()
    for i in range(rows):
        assert store.features(i)["clip_features"][0] == i
    assert mapped_kib() - start < 16 * 1024  # far below the 128 MiB read


def test_extract_cli_writes_the_stores_training_opens_and_a_second_run_writes_nothing(tmp_path, data_dir):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from captioner.extract import run
    from conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("extract", overrides=["experiment=smoke", f"paths.data_dir={data_dir}", "paths.root_dir=."])
    stores = run(cfg)
    assert set(stores) == {"train", "val", "test"}
    before = {p: p.stat().st_mtime_ns for s in stores.values() for p in s.iterdir()}
    assert run(cfg) == stores
    assert {p: p.stat().st_mtime_ns for s in stores.values() for p in s.iterdir()} == before
    datamodule = CaptionDataModule(**{k: v for k, v in cfg.data.items() if not k.startswith("_")})  # DictConfig values too
    datamodule.setup("fit")
    assert {s: datamodule.datasets[s].store.directory for s in stores} == stores


@pytest.mark.slow
def test_extract_cli_shards_over_two_ddp_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAPTIONER_DATA_DIR": str(tmp_path / "data")}
    single = subprocess.run([sys.executable, "-m", "captioner.extract", "experiment=smoke", f"hydra.run.dir={tmp_path}/a"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    features = tmp_path / "data" / "synthetic_smoke" / "features"
    for store in features.iterdir():
        if store.name.startswith("."):  # a store's lock (data/manifest.py::sole_writer)
            continue
        store.rename(store.with_name(store.name + "-single"))
    ddp = subprocess.run([sys.executable, "-m", "captioner.extract", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu",
                          f"hydra.run.dir={tmp_path}/b"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout
    for store in features.glob("*-single"):
        merged = store.with_name(store.name.removesuffix("-single"))
        assert json.loads((merged / "manifest.json").read_text()) == json.loads((store / "manifest.json").read_text())
        for name in ("clip_features", "patch_tokens"):
            assert np.array_equal(np.load(merged / f"{name}.npy"), np.load(store / f"{name}.npy"))


def test_training_batches_pad_to_their_own_longest_caption_and_buckets_cut_padding(smoke_cfg):
    from hydra.utils import instantiate

    def epoch(buckets: int, number: int = 0) -> list[dict]:
        datamodule = instantiate(smoke_cfg(f"data.length_buckets={buckets}", "data.batch_size=8").data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(number)
        return list(loader)

    plain, bucketed = epoch(0), epoch(4)
    for batches in (plain, bucketed):
        for batch in batches:
            lengths = batch["attention_mask"].sum(1)
            assert batch["input_ids"].shape[1] == lengths.max()  # no global maximum
            assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)
    def seen(batches: list[dict]) -> list[tuple]:
        return sorted(
            (int(image_id), tuple(ids[mask.bool()].tolist()))
            for b in batches
            for image_id, ids, mask in zip(b["image_id"], b["input_ids"], b["attention_mask"])
        )

    assert seen(plain) == seen(bucketed)  # the same (image, caption) pairs, once each
    def padding(batches: list[dict]) -> int:
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert padding(bucketed) < 0.5 * padding(plain)
    assert [b["image_id"].tolist() for b in epoch(4)] == [b["image_id"].tolist() for b in bucketed]  # seeded
    assert [b["image_id"].tolist() for b in epoch(4, 1)] != [b["image_id"].tolist() for b in bucketed]  # reshuffled per epoch


def _sharded(directory: Path, records, world_size: int = 2, encoder_factory=None) -> list[Exception]:
    """One distributed run of `world_size` ranks (threads joined by a barrier) on `directory`."""
    barrier, errors = threading.Barrier(world_size), []
    factory = encoder_factory or partial(ClipEncoder, TINY_CLIP)
    encoders = [factory() for _ in range(world_size)]

    def rank(r: int) -> None:
        try:
            extract(directory, records, encoder_factory=lambda: encoders[r], rank=r, world_size=world_size, barrier=barrier.wait)
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() else "a directory" for p in sorted(directory.iterdir())}


def test_a_second_merge_over_a_complete_store_leaves_it_bit_identical(tmp_path):
    """A second distributed job of a sweep on the same cache reaches its merge after the first one completed
    the store: the merge must not re-create the arrays (they were zeroed) nor declare a half store complete."""
    from captioner.data.extraction import Extraction
    from captioner.data.features import describe

    records = make_images(tmp_path / "images", 23)
    assert not _sharded(tmp_path / "store", records)
    before = _snapshot(tmp_path / "store")
    encoder = ClipEncoder(TINY_CLIP)
    manifest = describe(records, TINY_CLIP, "fp32", encoder.resolution, "train", "fp32", True)
    shapes = {"clip_features": (encoder.embed_dim,), "patch_tokens": (encoder.num_tokens, encoder.token_dim)}
    late = Extraction(records, encoder, manifest, shapes, 4, 0, "cpu", 0)
    (tmp_path / "store" / "shards" / "0-of-2").mkdir(parents=True)  # the late job's shards, left beside the store
    try:
        late.merge(tmp_path / "store", 2, "stop")
    finally:  # same files, same bytes, whether or not the merge raised: the shards are gone, the store kept
        assert _snapshot(tmp_path / "store") == before


def test_finish_refuses_a_store_with_rows_neither_done_nor_bad(tmp_path):
    from captioner.data.extraction import Extraction

    records = make_images(tmp_path / "images", 4)
    job = Extraction(records, None, {"dtype": "fp32", "split": "train"}, {}, 4, 0, "cpu", 0)
    (tmp_path / "store").mkdir()
    with pytest.raises(RuntimeError, match="1 rows were neither encoded nor reported unreadable"):
        job.finish(tmp_path / "store", np.array([1, 2]), {2: "cannot be decoded"}, "skip")
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_a_distributed_run_waits_for_another_jobs_lock_then_reads_its_store(tmp_path):
    """Jobs of a sweep under DDP share the store's lock: the second one writes nothing while the first
    holds it, and then finds the store complete."""
    from captioner.data.manifest import sole_writer

    records = make_images(tmp_path / "images", 12)
    assert not _sharded(tmp_path / "first", records)
    CountingEncoder.encoded = 0
    store, result = tmp_path / "store", []
    with sole_writer(store):  # the first job, still writing
        late = threading.Thread(target=lambda: result.append(_sharded(store, records, encoder_factory=partial(CountingEncoder, TINY_CLIP))))
        late.start()
        time.sleep(1.5)
        assert CountingEncoder.encoded == 0 and not store.exists()
        store.mkdir()
        for name, data in _snapshot(tmp_path / "first").items():  # the first job completes its store
            (store / name).write_bytes(data)
    late.join(timeout=120)
    assert result == [[]] and CountingEncoder.encoded == 0
    assert _snapshot(store) == _snapshot(tmp_path / "first")


def test_a_full_disk_is_one_error_with_the_bytes_needed_before_anything_is_written(tmp_path, monkeypatch):
    import shutil as shutil_module

    from captioner.data.disk import DiskFullError

    records = make_images(tmp_path / "images", 12)
    extract(tmp_path / "kept", records)
    kept = _snapshot(tmp_path / "kept")
    real = shutil_module.disk_usage
    monkeypatch.setattr("captioner.data.disk.shutil.disk_usage", lambda p: real(p)._replace(free=10_000))
    with pytest.raises(DiskFullError, match=r"feature store .*store needs .*MiB \(\d[\d,]+ bytes\) but .* has .*10,000 bytes\) free"):
        extract(tmp_path / "store", records)
    assert not list((tmp_path / "store").glob("*.npy"))  # no sparse file to SIGBUS on later
    assert _snapshot(tmp_path / "kept") == kept
