"""Preemption: SIGTERM saves the run at its current step and exits non-zero, `ckpt_path=auto` finishes it
like an uninterrupted run, and a resume that would change the data order or the optimizer is refused."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from captioner.callbacks import ResumeMismatchError
from captioner.checkpoint import read_checkpoint
from captioner.train import run
from conftest import ROOT, compose_train, pretrained
from test_resume import SCHEDULE, Probe, _wait_for, one_thread  # noqa: F401 - one_thread is a fixture


def test_sigterm_saves_the_current_step_exits_non_zero_and_auto_resume_ends_like_an_uninterrupted_run(tmp_path, data_dir, one_thread):
    reference = pretrained(compose_train(tmp_path / "reference", data_dir, [*SCHEDULE, "+callbacks.probe._target_=test_resume.Probe"]))
    datamodule = instantiate(reference.data)  # the feature store first: the signal below lands in training
    datamodule.prepare_data()
    datamodule.setup("fit")
    Probe.ended.clear()
    run(reference)
    expected = read_checkpoint(tmp_path / "reference" / "checkpoints" / "last.ckpt")

    preempted = tmp_path / "preempted"
    command = [sys.executable, "-m", "captioner.train", *SCHEDULE, f"paths.data_dir={data_dir}", f"hydra.run.dir={preempted}"]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(preempted / "checkpoints" / "last.ckpt", process)  # the checkpoint of the validation at step 10
        validated = read_checkpoint(preempted / "checkpoints" / "last.ckpt")["global_step"]
        time.sleep(0.5)  # into the steps after that checkpoint: only SIGTERM can save them
        os.kill(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    said = re.search(r"preempted: SIGTERM at step (\d+)", stderr)
    assert said, stderr[-3000:]
    saved = read_checkpoint(preempted / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == int(said.group(1)) and validated < saved["global_step"] < Probe.ended[0]

    resumed = compose_train(preempted, data_dir, [*SCHEDULE, "ckpt_path=auto", "+callbacks.probe._target_=test_resume.Probe"])
    run(resumed)
    assert Probe.seen["global_step"] == saved["global_step"]
    assert Probe.ended == [40, 40]  # the uninterrupted run's final step, and the resumed run's
    final = read_checkpoint(preempted / "checkpoints" / "last.ckpt")
    assert final["global_step"] == expected["global_step"]
    for name, weight in expected["state_dict"].items():  # same data order, noise and moments: the same weights
        torch.testing.assert_close(final["state_dict"][name], weight, rtol=0, atol=0, msg=name)


class SigtermAtFirstEpochEnd(L.Callback):
    """Delivers SIGTERM as Lightning's handler does (its flag), while the first epoch ends: Lightning then
    raises after counting that epoch complete, the moment a real signal during end-of-epoch validation hits."""

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.current_epoch == 0:
            trainer._signal_connector.received_sigterm = True


def test_sigterm_at_an_epoch_end_resumes_into_the_next_epoch_not_past_it(tmp_path, data_dir, one_thread):
    reference = pretrained(compose_train(tmp_path / "reference", data_dir, [*SCHEDULE, "+callbacks.probe._target_=test_resume.Probe"]))
    Probe.ended.clear()
    run(reference)
    expected = read_checkpoint(tmp_path / "reference" / "checkpoints" / "last.ckpt")

    preempted = tmp_path / "preempted"
    with pytest.raises(SystemExit) as exited:
        run(compose_train(preempted, data_dir, [*SCHEDULE, "+callbacks.sigterm._target_=test_preemption.SigtermAtFirstEpochEnd"]))
    assert exited.value.code == 128 + signal.SIGTERM
    saved = read_checkpoint(preempted / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == Probe.ended[0] // 2  # the first of two epochs, whole

    run(compose_train(preempted, data_dir, [*SCHEDULE, "ckpt_path=auto", "+callbacks.probe._target_=test_resume.Probe"]))
    assert Probe.seen["global_step"] == saved["global_step"]
    assert Probe.ended == [40, 40]  # the second epoch trained, not taken for already run
    final = read_checkpoint(preempted / "checkpoints" / "last.ckpt")
    for name, weight in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], weight, rtol=0, atol=0, msg=name)


def test_resuming_with_another_batch_size_or_lr_is_refused_before_anything_changes(tmp_path, data_dir):
    cfg = compose_train(tmp_path / "run", data_dir, ["experiment=smoke", "score=false", "trainer.max_steps=2", "model.val_cider_images=0"])
    run(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    config = (tmp_path / "run" / "config.yaml").read_text()
    changed = compose_train(tmp_path / "run", data_dir, ["experiment=smoke", "score=false", "trainer.max_steps=2", "model.val_cider_images=0",
                                                         "ckpt_path=auto", "data.batch_size=8", "model.lr=0.01"])
    with pytest.raises(ResumeMismatchError, match=r"data.batch_size \(checkpoint 16, now 8\); model.lr \(checkpoint 0.001, now 0.01\)"):
        run(changed)
    assert (tmp_path / "run" / "config.yaml").read_text() == config  # still the settings the checkpoint was trained with
    assert read_checkpoint(last)["global_step"] == 2
