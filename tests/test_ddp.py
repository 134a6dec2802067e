"""trainer=ddp: the embedded default on 2 CPU processes (gloo), one set of outputs from global rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from captioner.checkpoint import read_checkpoint
from conftest import ROOT


def test_two_cpu_processes_finish_the_tiny_run_and_write_one_set_of_outputs(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "captioner.train", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu",
               "debug=limit", "logger=csv", f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path / 'outputs'}",
               f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "distributed_backend=gloo" in log

    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2  # debug=limit: 2 steps, each a batch on every rank
    assert len(list((run_dir / "checkpoints").glob("*.ckpt"))) == 2  # best by val/cider + last, once
    captions = json.loads((run_dir / "captions_test.json").read_text())
    assert len(captions) == 16 and len({c["image_id"] for c in captions}) == 16  # the test split, once
    assert "model" in json.loads((run_dir / "scores.json").read_text())
    assert "val/cider" in json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "loss_curve.png").stat().st_size > 0
    assert len((run_dir / "csv" / "metrics.csv").read_text().splitlines()) > 1
    # nothing else anywhere: the second process wrote no run directory of its own
    assert not (tmp_path / "outputs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
