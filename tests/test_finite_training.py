"""Non-finite training: a NaN stops the run naming its step (or the step is skipped), and no checkpoint
ever holds a non-finite weight."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from captioner.callbacks import NonFiniteError
from captioner.checkpoint import read_checkpoint
from captioner.train import run
from conftest import compose_train

# a checkpoint (last.ckpt) after every step, so the test can see which weights were written
EVERY_STEP = ["experiment=smoke", "score=false", "model.val_cider_images=0", "+callbacks.model_checkpoint.every_n_train_steps=1",
              "callbacks.model_checkpoint.monitor=null",
              "+callbacks.nan._target_=test_finite_training.InjectNaN"]


class InjectNaN(L.Callback):
    """Turns the features of the batch at step 3 into NaN, as a corrupt row or an overflow would."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            for value in batch.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    value.fill_(float("nan"))


def _finite(checkpoint: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in checkpoint["state_dict"].values() if t.is_floating_point())


def test_a_nan_at_step_3_stops_the_run_naming_the_step_and_last_ckpt_stays_finite(tmp_path, data_dir):
    cfg = compose_train(tmp_path / "run", data_dir, EVERY_STEP)
    with pytest.raises(NonFiniteError, match=r"loss is nan at step 3: training stopped"):
        run(cfg)
    last = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and _finite(last)


def test_skip_drops_the_nan_step_and_trains_on_with_finite_weights(tmp_path, data_dir):
    cfg = compose_train(tmp_path / "run", data_dir, [*EVERY_STEP, "callbacks.finite.on_non_finite=skip", "trainer.max_steps=6"])
    run(cfg)
    last = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6 and _finite(last)
    guard = next(v for k, v in last["callbacks"].items() if "FiniteTraining" in k)
    assert guard["skipped"] == [3]


def test_a_checkpoint_with_non_finite_weights_is_refused_before_it_is_written(tmp_path):
    from captioner.callbacks import FiniteTraining

    class Trainer:
        global_step = 7

    with pytest.raises(NonFiniteError, match=r"refusing to write a checkpoint at step 7: 1 tensors are not finite \(w"):
        FiniteTraining().on_save_checkpoint(Trainer(), None, {"state_dict": {"w": torch.tensor([1.0, float("inf")]), "b": torch.ones(2)}})
