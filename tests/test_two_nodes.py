"""Two nodes x one process on loopback, started as a cluster starts them (torchrun's --nnodes 2
--node_rank N --master_addr): sharded extraction writes the single-process store bit for bit, and DDP
training reaches the single-process run's global step with every output written by global rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from captioner.checkpoint import read_checkpoint
from conftest import ROOT
from test_serve import free_port

SMOKE = ["experiment=smoke", "logger=csv"]


def on_two_nodes(tmp_path: Path, name: str, module: str, *overrides: str, env: dict) -> list[str]:
    """Start node 0 and node 1 (one process each) of `python -m module`; each node its own run directory,
    as on two machines sharing the data directory. Returns each node's log."""
    port, nodes = free_port(), []
    for node in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", module,
                   *overrides, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
                   f"hydra.run.dir={tmp_path / f'{name}-node{node}'}"]
        nodes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-4000:]
    return logs


def single(tmp_path: Path, name: str, module: str, *overrides: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", module, *overrides, f"hydra.run.dir={tmp_path / name}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_two_nodes_extract_the_single_process_store_and_train_to_the_same_step(tmp_path):
    data = tmp_path / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAPTIONER_DATA_DIR": str(data)}
    single(tmp_path, "extract-single", "captioner.extract", *SMOKE, env=env)
    features = data / "synthetic_smoke" / "features"
    stores = sorted(p for p in features.iterdir() if p.name != "pretrained" and not p.name.startswith("."))  # caches, locks beside
    assert [s.name.split("-")[0] for s in stores] == ["test", "train", "val"]
    for store in stores:
        store.rename(store.with_name(store.name + "-single"))

    logs = on_two_nodes(tmp_path, "extract", "captioner.extract", *SMOKE, env=env)
    assert "written by 2 process(es)" in logs[0] and "written by" not in logs[1]  # the table from global rank 0
    for store in stores:
        kept = store.with_name(store.name + "-single")
        assert json.loads((store / "manifest.json").read_text()) == json.loads((kept / "manifest.json").read_text())
        for name in ("clip_features", "patch_tokens"):
            assert np.array_equal(np.load(store / f"{name}.npy"), np.load(kept / f"{name}.npy"))
        assert not (store / "shards").exists()

    train = [*SMOKE, "debug=limit", "score_meteor=false", f"paths.log_dir={tmp_path / 'outputs'}"]
    single(tmp_path, "train-single", "captioner.train", *train, env=env)
    logs = on_two_nodes(tmp_path, "train", "captioner.train", *train, env=env)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1] and "distributed_backend=gloo" in logs[0]
    one, two = (read_checkpoint(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("train-single", "train-node0"))
    assert two["global_step"] == one["global_step"] == 2  # debug=limit: 2 steps, each a batch on every rank
    node0, node1 = tmp_path / "train-node0", tmp_path / "train-node1"
    assert {"checkpoints", "config.yaml", "metrics.json", "scores.json", "captions_test.json"} <= {p.name for p in node0.iterdir()}
    assert sorted(p.name for p in node1.iterdir() if p.name != ".hydra" and not p.name.endswith(".log")) == []  # rank 1 wrote nothing
    assert len(json.loads((node0 / "captions_test.json").read_text())) == 16
    assert not (tmp_path / "outputs").exists()
