"""Crash-safe training: SIGKILL after a checkpoint, resume, and finish exactly like an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from lightning.pytorch.demos.boring_classes import BoringModel

from captioner.callbacks import PreemptionCheckpoint
from captioner.checkpoint import AtomicCheckpointIO, RunDirectoryInUseError, read_checkpoint, resolve_ckpt_path
from captioner.train import run
from conftest import ROOT, compose_train, pretrained

# validation (and so best + last checkpoints) every 10 of the 20 steps per epoch, over 2 epochs
SCHEDULE = ["experiment=smoke", "trainer.max_epochs=2", "+trainer.val_check_interval=10", "model.val_cider_images=4", "score=false"]


class Probe(L.Callback):
    """Records what the trainer holds when training (re)starts."""

    seen: dict = {}
    ended: list[int] = []

    def on_train_end(self, trainer, module) -> None:
        Probe.ended.append(trainer.global_step)

    def on_train_start(self, trainer, module) -> None:
        Probe.seen = {
            "global_step": trainer.global_step,
            "optimizer": {k: v.clone() for k, v in trainer.optimizers[0].state_dict()["state"].get(0, {}).items()},
            "lr": trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0],
        }


def _wait_for(path, process, timeout=120.0):
    start = time.monotonic()
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"training ended (rc {process.returncode}) before {path} appeared")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


@pytest.fixture
def one_thread():
    """Bit-identical weights need one reduction order: the subprocess runs on one thread, so must we."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sigkilled_run_resumes_at_its_checkpoint_and_ends_like_an_uninterrupted_one(tmp_path, data_dir, one_thread):
    reference = pretrained(compose_train(tmp_path / "reference", data_dir, [*SCHEDULE, "+callbacks.probe._target_=test_resume.Probe"]))
    # extract the feature store first, so the timing of the kill below is spent on training
    datamodule = instantiate(reference.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    run(reference)
    expected = read_checkpoint(tmp_path / "reference" / "checkpoints" / "last.ckpt")

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "captioner.train", *SCHEDULE, f"paths.data_dir={data_dir}", f"hydra.run.dir={killed}"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(killed / "checkpoints" / "last.ckpt", process)
        time.sleep(0.3)  # let it train on past the checkpoint, so that resuming must go back to it
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    saved = read_checkpoint(killed / "checkpoints" / "last.ckpt")  # whole, whatever the kill interrupted
    assert 0 < saved["global_step"] < expected["global_step"]

    resumed = compose_train(killed, data_dir, [*SCHEDULE, "ckpt_path=auto", "+callbacks.probe._target_=test_resume.Probe"])
    run(resumed)
    assert Probe.seen["global_step"] == saved["global_step"]
    for key, value in saved["optimizer_states"][0]["state"][0].items():
        torch.testing.assert_close(Probe.seen["optimizer"][key], value, rtol=0, atol=0)
    assert Probe.seen["lr"] == pytest.approx(saved["lr_schedulers"][0]["_last_lr"][0])

    assert Probe.ended[-1] == Probe.ended[0] == 40  # the resumed run ends at the uninterrupted run's step
    final = read_checkpoint(killed / "checkpoints" / "last.ckpt")
    assert final["global_step"] == expected["global_step"]
    # same data order, same noise, same optimizer moments: the same weights as the uninterrupted run
    for name, weight in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], weight, rtol=0, atol=0, msg=name)


def test_auto_resume_starts_fresh_without_a_checkpoint_and_a_missing_path_fails(tmp_path):
    assert resolve_ckpt_path("auto", tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("auto", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(FileNotFoundError, match="ckpt_path=auto"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)


def test_a_fresh_run_into_a_directory_holding_a_run_is_refused_and_changes_nothing(tmp_path, capsys):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"the first run's weights")
    with pytest.raises(RunDirectoryInUseError, match="ckpt_path=auto.*hydra.run.dir"):
        resolve_ckpt_path(None, tmp_path)
    assert resolve_ckpt_path("auto", tmp_path) == str(last)

    # as typed: one line, status 2, before Hydra or the run writes anything in the directory
    done = subprocess.run([sys.executable, "-m", "captioner.train", "experiment=smoke", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"error: {last} exists: this run directory holds a run. Resume it with ckpt_path=auto, or start a fresh run in "
        "another directory (hydra.run.dir=...)"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "last.ckpt"]
    assert last.read_bytes() == b"the first run's weights"


def test_preemption_checkpoint_does_not_make_a_fresh_fit_resume_the_last_checkpoint(tmp_path):
    """With Lightning's OnExceptionCheckpoint among the callbacks, `fit(ckpt_path=None)` resumes the newest
    `last` checkpoint it finds; a fresh fit must start at step 0 whatever the directory holds."""
    def fit(max_steps: int) -> L.Trainer:
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                            callbacks=[PreemptionCheckpoint(str(tmp_path)), _StartStep()])
        trainer.fit(BoringModel())
        return trainer

    fit(3).save_checkpoint(tmp_path / "last.ckpt")
    assert fit(2).global_step == 2 and _StartStep.seen == [0, 0]


class _StartStep(L.Callback):
    seen: list[int] = []

    def on_train_start(self, trainer, module) -> None:
        _StartStep.seen.append(trainer.global_step)


class _Exploding:
    """Pickles halfway, then fails: a save interrupted after part of the file was written."""

    def __reduce__(self):
        raise RuntimeError("killed mid-save")


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "weights": torch.arange(10_000.0)}, path)
    with pytest.raises(RuntimeError, match="mid-save"):
        io.save_checkpoint({"global_step": 2, "weights": torch.zeros(10_000), "bad": _Exploding()}, path)
    restored = io.load_checkpoint(path)
    assert restored["global_step"] == 1 and torch.equal(restored["weights"], torch.arange(10_000.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
