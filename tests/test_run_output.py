"""What a run prints is what a user can act on: no zero FLOPs, no negative epoch count, no weight-loading
bars, no DataLoader warning about more workers than CPUs, no "written" when nothing was."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, compose_train


def _command(*args: str, data_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CAPTIONER_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_run_prints_nothing_a_user_cannot_act_on(tmp_path):
    data = tmp_path / "data"  # its own: the pretraining steps run (and draw their bars) in this process
    out = _command("-m", "captioner.train", "experiment=smoke", "score=false", f"hydra.run.dir={tmp_path / 'run'}", data_dir=data)
    assert "Total params" in out  # the model summary is still printed
    assert "FLOPs" not in out
    assert "/-2" not in out and "Epoch 0/0" in out  # pretraining's bar counts the epochs its steps take
    assert "Loading weights" not in out
    again = _command("-m", "captioner.extract", "experiment=smoke", f"hydra.run.dir={tmp_path / 'extract'}", data_dir=data)
    assert "nothing to extract" in again and "written by" not in again


def test_dataloader_workers_never_outnumber_the_cpus(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    for data in ("custom", "coco", "webdataset"):
        assert compose_train(tmp_path, tmp_path, [f"data={data}"]).data.num_workers <= cpus
