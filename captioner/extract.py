"""python -m captioner.extract [experiment=...] [overrides]: encode every image of every split once.

The stores are the ones training opens (`data.cache_dir`, named by split and image set), so a later
`python -m captioner.train` with the same config starts at once. A killed run resumes where it
stopped; a complete store is left untouched; a store made with other settings is refused.
With several devices or nodes (`trainer.devices`, `trainer.num_nodes`) Lightning Fabric starts one
process per device: each encodes a shard of the images and rank 0 merges the shards.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from captioner.config import hydra_main
from captioner.data.manifest import MANIFEST
from captioner.pretraining import prepare as prepare_pretrained


def fabric_for(trainer_cfg: DictConfig) -> L.Fabric:
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1)
    several = nodes > 1 or devices not in (1, "1", "auto")  # "auto" on CPU is one process
    return L.Fabric(
        accelerator=trainer_cfg.get("accelerator", "auto"),
        devices=devices,
        num_nodes=nodes,
        strategy="ddp" if several else "auto",
    )


def run(cfg: DictConfig) -> dict[str, Path]:
    """Extract the configured splits; returns each split's store directory."""
    fabric = fabric_for(cfg.trainer)
    fabric.launch()
    datamodule = instantiate(cfg.data)
    if fabric.global_rank == 0:
        datamodule.prepare_data()  # writes the embedded dataset on first use
        prepare_pretrained(cfg.get("pretrain"))  # the tiny CLIP that encodes the images, cached (as in train)
    fabric.barrier()
    shard = dict(rank=fabric.global_rank, world_size=fabric.world_size, barrier=fabric.barrier, device=fabric.device)
    cache = Path(cfg.data.cache_dir)
    finished = {m: m.stat().st_mtime_ns for m in cache.glob(f"*/{MANIFEST}")}  # a store's manifest is written last
    table = Table("split", "images", "skipped", title="feature stores")
    stores = {}
    for split in cfg.splits or list(datamodule.splits):
        records, store = datamodule.load_split(split, **shard)
        stores[split] = store.directory
        table.add_row(split, str(len(records)), str(len(store.skipped)))  # the text store has a row per caption
    if fabric.global_rank == 0:
        Console().print(table)
        written = [m for m in cache.glob(f"*/{MANIFEST}") if finished.get(m) != m.stat().st_mtime_ns]
        if written:
            print(f"{len(written)} store(s) written by {fabric.world_size} process(es) into {cache.resolve()}")
        else:
            print(f"nothing to extract: the stores in {cache.resolve()} were complete")
    return stores


@hydra_main("extract")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
