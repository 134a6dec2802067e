"""An open_clip ViT-B-16-SigLIP and GPT-2 124M at full size, saved as a user has them (random weights: an open_clip
checkpoint file and a save_pretrained directory), through extract -> train (3 steps) -> caption on a few COCO photos,
each stage in its own process (GPT-2 frozen, as in ClipCap's transformer variant); prints each stage's wall time and peak RSS (docs/models.md quotes them).

    python -m pytest -m slow tests/test_towers_full_size.py -s
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from rich.table import Table

from conftest import SHARED_DATA
from test_real_path import Stages, run_stage

pytestmark = pytest.mark.slow
SPLITS = {"train": 8, "val": 4, "test": 4}  # images of coco_mini per split: a few, the models are what is big


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    """(ViT-B-16-SigLIP checkpoint file, GPT-2 124M directory with GPT-2's tokenizer)."""
    import open_clip
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = SHARED_DATA / "gpt2_tokenizer"
    if not (tokenizer / "vocab.json").is_file() or not (SHARED_DATA / "coco_mini").is_dir():
        pytest.skip("../shared/data (gpt2_tokenizer, coco_mini) is not present")
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    siglip = open_clip.create_model("ViT-B-16-SigLIP")  # no pretrained=: random weights at the published size
    assert sum(p.numel() for p in siglip.visual.parameters()) > 90e6
    torch.save(siglip.state_dict(), folder / "open_clip_model.pt")
    gpt2 = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 124,439,808 parameters
    gpt2.save_pretrained(folder / "gpt2")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer / name, folder / "gpt2" / name)
    return folder / "open_clip_model.pt", folder / "gpt2"


def _few_photos(folder: Path) -> Path:
    """coco_mini's Karpathy file cut to SPLITS' counts."""
    data = json.loads((SHARED_DATA / "coco_mini" / "annotations" / "dataset_coco_mini_karpathy_format.json").read_text())
    kept, left = [], dict(SPLITS)
    for image in data["images"]:
        if left.get(image["split"], 0) > 0:
            kept.append(image)
            left[image["split"]] -= 1
    path = folder / "karpathy_few.json"
    path.write_text(json.dumps({**data, "images": kept}))
    return path


def test_siglip_and_gpt2_at_full_size_extract_train_and_caption(saved, tmp_path):
    checkpoint, gpt2 = saved
    coco_mini = SHARED_DATA / "coco_mini"
    encoder = f"{{source: open_clip, name: ViT-B-16-SigLIP, checkpoint: '{checkpoint}', layer: -2}}"
    common = ["experiment=coco_attn", "data=karpathy", f"data.splits.train.file={_few_photos(tmp_path)}",
              f"data.splits.train.images={coco_mini / 'images'}", f"data.cache_dir={tmp_path / 'features'}",
              "data.num_workers=0", "data.extract_batch_size=8", f"model.encoder={encoder}", f"model.decoder={gpt2}",
              f"model.tokenizer={gpt2}", "trainer=cpu", "trainer.precision=32", "logger=csv"]
    stages = Stages("towers")
    run_stage(stages, "extract (16 photos)", "captioner.extract", *common, f"hydra.run.dir={tmp_path / 'extract'}")
    store = next((tmp_path / "features").glob("train-*/manifest.json"))
    manifest = json.loads(store.read_text())
    assert manifest["encoder"]["name"] == "ViT-B-16-SigLIP" and manifest["encoder_sha256"]
    assert np.load(store.parent / "patch_tokens.npy", mmap_mode="r").shape == (8, 196, 768)  # 14 x 14 patches, no class token

    train_dir = tmp_path / "train"
    run_stage(stages, "train (3 steps)", "captioner.train", *common, "trainer.max_steps=3", "trainer.limit_val_batches=1",
              "model.val_cider_images=2", "model.val_decoding.max_new_tokens=5", "data.batch_size=4", "score=false",
              # ClipCap's frozen-GPT-2 variant with a one-layer mapper: the optimizer's state stays small on a shared 24 GB machine
              "model.decoder_mode=frozen", "model.mapper.num_layers=1",
              "score_meteor=false", f"hydra.run.dir={train_dir}")
    ckpt = train_dir / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 3

    photos = sorted((coco_mini / "images" / "val2017").glob("*.jpg"))[:4]
    run_stage(stages, "caption (4 photos)", "captioner.caption", "--ckpt", str(ckpt), *map(str, photos),
              "-o", str(tmp_path / "captions.jsonl"), "--max-new-tokens", "8")
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["caption"], str) for r in rows)

    table = Table("stage", "wall s", "peak RSS MiB", title="open_clip ViT-B-16-SigLIP + GPT-2 124M (CPU)")
    for name, seconds, rss in stages.rows:
        table.add_row(name, f"{seconds:.0f}", f"{rss:.0f}")
    table.add_row("total", f"{sum(s for _, s, _ in stages.rows):.0f}", f"{max(r for _, _, r in stages.rows):.0f}")
    Console(width=120).print(table)
