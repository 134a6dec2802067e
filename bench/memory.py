"""Peak memory of a training epoch over a feature store of N and of 10*N images.

    .venv/bin/python bench/memory.py [--rows 2000]

Each epoch runs in a fresh process (the real CaptionDataModule, CaptionModule and Lightning Trainer,
one caption per image) over a store of ViT-B/32-shaped synthetic features: pooled (512) + 49 patch
tokens (49 x 512), fp16, 51 KB per image, so the 10*N store is ten times bigger than the N one.
The child reports its peak RSS (VmHWM; mapped file pages that stay resident count).
Training reads the store memory-mapped and releases each row's pages after copying it, so the peak
should not grow with the store: target 10*N <= 1.2x N. The baseline, in the same script, loads the
features into RAM first, as ClipCap's pickle does.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import roofline  # bench/, beside this file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's captioner, not an installed one

ENCODER = dict(  # ViT-B/32's feature shapes (embed 512, 224 px, 32 px patches: 49 tokens), one thin layer
    embed_dim=512, image_resolution=224, vision_layers=1, vision_width=64, vision_patch_size=32,
    context_length=16, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1,
)


def write_split(root: Path, split: str, rows: int, captions: list[str]) -> dict:
    """COCO-format captions + a complete feature store where CaptionDataModule will look for it."""
    from captioner.data.coco import load_coco
    from captioner.data.features import describe, identity_hash, store_key

    coco = {
        "images": [{"id": i, "file_name": f"{split}/{i:08d}.jpg"} for i in range(1, rows + 1)],
        "annotations": [{"id": i, "image_id": i, "caption": captions[i % len(captions)]} for i in range(1, rows + 1)],
    }
    annotations = root / f"captions_{split}.json"
    annotations.write_text(json.dumps(coco))
    records = load_coco(annotations, root / "images")
    store = root / "features" / f"{split}-{store_key(identity_hash(records), ENCODER)}"
    store.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = {"clip_features": (512,), "patch_tokens": (49, 512)}
    for name, shape in shapes.items():
        array = np.lib.format.open_memmap(store / f"{name}.npy", mode="w+", dtype=np.float16, shape=(rows, *shape))
        for s in range(0, rows, 1024):
            array[s : s + 1024] = rng.standard_normal((min(1024, rows - s), *shape), dtype=np.float32)
        array.flush()
        del array
    manifest = {**describe(records, ENCODER, "fp32", 224, split, "fp16", True), "skipped": []}
    (store / "manifest.json").write_text(json.dumps(manifest))
    return {"annotations": str(annotations), "images": str(root / "images")}


def load_whole() -> None:
    """The baseline: every store read into RAM when opened (ClipCap keeps one pickle in memory)."""
    from captioner.data.features import FeatureStore

    opened = FeatureStore.__init__

    def in_ram(self, directory):
        opened(self, directory)
        self.clip_features = np.array(self.clip_features)
        self.patch_tokens = np.array(self.patch_tokens)

    FeatureStore.__init__ = in_ram


def epoch(root: Path, splits: dict, batch_size: int) -> float:
    """One training epoch; runs in the child process."""
    import lightning as L

    from captioner.data.datamodule import CaptionDataModule
    from captioner.module import CaptionModule

    tokenizer = str(root / "synthetic" / "tokenizer")
    datamodule = CaptionDataModule(splits, ENCODER, tokenizer, str(root / "features"), batch_size=batch_size, eval_batch_size=batch_size)
    module = CaptionModule(
        encoder=ENCODER, decoder={"n_layer": 1, "n_embd": 64, "n_head": 2, "n_positions": 64}, tokenizer=tokenizer,
        mapper={"name": "attention", "num_layers": 1, "num_heads": 2}, prefix_length=4, warmup_steps=10, lr=1e-3,
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    assert trainer.global_step == -(-len(datamodule.datasets["train"]) // batch_size)  # the whole store was read
    return seconds


def peak_rss_kib() -> int:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across
    exec from the parent's address space (vfork), so a child would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        return int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:")))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="N: images in the small store")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-ram", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # the measured process: train one epoch, report the peak RSS
        if args.in_ram:
            load_whole()
        state = json.loads((args.child / "splits.json").read_text())
        seconds = epoch(args.child, state, args.batch_size)
        print(json.dumps({"peak_rss_mib": peak_rss_kib() / 1024, "seconds": seconds}))
        return

    from captioner.data.synthetic import write_dataset
    from captioner.pretraining import train_tokenizer

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (args.rows, 10 * args.rows):
            root = Path(tmp) / f"rows{rows}"
            write_dataset(root / "synthetic", seed=0, sizes={"train": 40, "val": 4, "test": 4}, image_size=32)  # captions
            train_json = json.loads((root / "synthetic" / "annotations" / "captions_train.json").read_text())
            captions = [a["caption"] for a in train_json["annotations"]]
            train_tokenizer(captions, root / "synthetic" / "tokenizer", vocab_size=512)
            splits = {"train": write_split(root, "train", rows, captions), "val": write_split(root, "val", 16, captions)}
            (root / "splits.json").write_text(json.dumps(splits))
            stores = [d for d in (root / "features").glob("train-*") if d.is_dir()]  # not the stores' .lock files
            store_mib = sum(p.stat().st_size for d in stores for p in d.glob("*.npy")) / 2**20
            for method, flags in (("ours: memory-mapped", []), ("baseline: loaded into RAM", ["--in-ram"])):
                command = [sys.executable, __file__, "--child", str(root), "--batch-size", str(args.batch_size), *flags]
                child = subprocess.run(command, capture_output=True, text=True)
                if child.returncode:
                    sys.exit(child.stderr[-4000:])
                reply = json.loads(child.stdout.strip().splitlines()[-1])
                peak = reply["peak_rss_mib"]
                results.append((method, rows, store_mib, peak, reply["seconds"]))
                print(f"{method}, {rows} rows: store {store_mib:.0f} MiB, peak RSS {peak:.0f} MiB", flush=True)
            shutil.rmtree(root / "features")  # the stores and their .lock files: the next size needs the disk

    # the epoch is bound by reading the store: its share of the probed read bandwidth (the model is tiny)
    bandwidth = roofline.probe().read_gbs
    table = Table(title=f"peak RSS of one training epoch (lower is better); probed read bandwidth {bandwidth:.1f} GB/s")
    for column in ("method", "store rows", "store size MiB", "peak RSS MiB", "vs same method at N", "epoch s", "store GB/s", "% of read bandwidth"):
        table.add_column(column, justify="left" if column == "method" else "right")
    at_n = {method: peak for method, rows, _, peak, _ in results if rows == args.rows}
    for method, rows, store_mib, peak, seconds in sorted(results, key=lambda r: (r[0] != results[0][0], r[1])):
        rate = store_mib * 2**20 / seconds / 1e9
        table.add_row(method, str(rows), f"{store_mib:.0f}", f"{peak:.0f}", f"{peak / at_n[method]:.2f}x", f"{seconds:.1f}", f"{rate:.2f}",
                      f"{100 * rate / bandwidth:.1f} %")
    Console(width=120).print(table)
    ours = [peak for method, _, _, peak, _ in results if method == results[0][0]]
    ratio = ours[1] / ours[0]
    print(f"target 10N <= 1.2x N: {'met' if ratio <= 1.2 else 'NOT met'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
