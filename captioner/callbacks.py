"""Training callbacks: pictures of the run, the random state a resumed run needs, and the guard that
keeps non-finite numbers out of the weights and the checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from captioner.data.sampler import ResumableLoader, ResumableSampler


class ResumeState(L.Callback):
    """What a resumed run needs beyond Lightning's own restore, so it repeats the uninterrupted run exactly:

    - the global torch/numpy/Python random state (training noise continues the same stream), saved as
      plain tensors and ints so the checkpoint still loads with `weights_only=True`;
    - the training loader's position (data/sampler.py): counted here as batches reach the model (not
      as the loader yields them: Lightning prefetches one). Lightning saves it through the loader's
      public `state_dict()`, but it builds the train loader, and draws its first batch, before it
      restores loop state when `configure_optimizers` asks for `estimated_stepping_batches`: the saved
      position would be dropped and the epoch restarted from its first batch. Lightning 2.6 has no
      public hook between the two, so the pending state is read from the fit loop once training
      starts, and the iterator (with its prefetched batch) is made again from there."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            sampler.consumed += 1  # the resume position: batches the model received

    def on_train_start(self, trainer, module) -> None:
        loader, fit_loop = trainer.train_dataloader, trainer.fit_loop
        if not isinstance(loader, ResumableLoader) or not trainer.ckpt_path:
            return
        pending = fit_loop._combined_loader_states_to_load
        if pending:
            loader.load_state_dict(pending[0])
            fit_loop._combined_loader_states_to_load = []
        iter(fit_loop._data_fetcher)

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, state, python_gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(state), python_gauss],
        }

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, python_state, python_gauss = state["python"]
        random.setstate((version, tuple(python_state), python_gauss))


class BestAndLastCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose `last.ckpt` is the latest validated step.

    Lightning writes `last.ckpt` only at a step where it also wrote a top-k checkpoint, so when the
    monitored metric stops improving, `last.ckpt` stays at the best step: a resume (`ckpt_path=auto`)
    would repeat the steps after it and "the last model" would be the best one. Here every validation
    also writes `last.ckpt`."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # Lightning saves here, not at the epoch's end
            self._save_last_if_unsaved(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_unsaved(trainer)

    def _save_last_if_unsaved(self, trainer: L.Trainer) -> None:
        # after Lightning's own save, so its top-k checkpoint of this step is written first; skipped when
        # this step is already saved (the top-k save wrote last.ckpt with it)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class PreemptionCheckpoint(Checkpoint):
    """SIGTERM (SLURM's preemption, `scancel`, a spot instance going away) saves the run at its current step
    as `dirpath/last.ckpt`, which `ckpt_path=auto` resumes.

    Lightning's own signal handling does the rest: its SIGTERM handler sets `trainer.received_sigterm`,
    the loop finishes the batch in hand (every rank of a distributed run, by broadcast) and raises
    SIGTERMException, which reaches `on_exception` here; any other exception (a crash, a NaN) saves
    nothing, so it cannot overwrite the last good checkpoint. The entry point then exits non-zero
    (`captioner.train`: 143, as a process killed by SIGTERM).

    This is a plain `Checkpoint`, not Lightning's `OnExceptionCheckpoint`: with one of those among the
    callbacks, `Trainer.fit(ckpt_path=None)` resumes the newest `last` checkpoint it can find, so a run
    meant to start fresh would silently continue another. Resuming is `ckpt_path`'s job alone."""

    def __init__(self, dirpath: str, filename: str = "last"):
        super().__init__()
        self.ckpt_path = str(Path(dirpath) / f"{filename}.ckpt")

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            fit = trainer.fit_loop
            if fit.epoch_progress.current.completed == fit.epoch_progress.current.ready:
                # the signal ended an epoch (Lightning raises after counting it complete): save it as the next
                # epoch's start; with the ended epoch's batch count kept, a resume would take the next epoch
                # for already run and stop training one epoch early
                fit.epoch_loop.batch_progress.reset_on_run()
                fit.epoch_loop.scheduler_progress.reset_on_run()
                fit.epoch_loop.automatic_optimization.optim_progress.reset_on_run()
            trainer.save_checkpoint(self.ckpt_path)
            rank_zero_warn(f"SIGTERM at step {trainer.global_step}: saved {self.ckpt_path}; resume with ckpt_path=auto")


class ResumeMismatchError(ValueError):
    """A run resumed with settings that change its data order or its optimizer."""


class RunSettings(L.Callback):
    """Keeps, in every checkpoint, the settings that fix the data order and the optimizer (`settings`:
    config key -> value); resuming a checkpoint is refused when they differ (`check_resume`)."""

    def __init__(self, settings: dict):
        self.settings = dict(settings)

    def state_dict(self) -> dict:
        return {"settings": self.settings}

    def load_state_dict(self, state: dict) -> None:
        pass  # compared before training starts, by check_resume


def check_resume(checkpoint: dict, settings: dict, allow_changes: bool = False) -> list[str]:
    """The settings of `checkpoint` (its RunSettings state) that differ from `settings`, as phrases.
    Raises ResumeMismatchError listing them unless `allow_changes`; a checkpoint without RunSettings
    (written before it existed) is not checked."""
    saved = next((v["settings"] for k, v in checkpoint.get("callbacks", {}).items() if k.startswith("RunSettings")), None)
    if saved is None:
        return []
    changed = [f"{k} (checkpoint {saved.get(k)!r}, now {v!r})" for k, v in settings.items() if saved.get(k) != v]
    if changed and not allow_changes:
        raise ResumeMismatchError(
            f"resuming would change the data order or the optimizer: {'; '.join(changed)}. Resume with the checkpoint's "
            f"values, start a new run directory, or pass +allow_resume_changes=true (the optimizer and its schedule "
            f"still come from the checkpoint)"
        )
    return changed


class NonFiniteError(RuntimeError):
    """Training produced a NaN or an infinity; the message names the step and what was not finite."""


FIX = "lower model.lr, or set callbacks.finite.on_non_finite=skip to skip such steps"


def _finite(tensors) -> bool:
    """Every value of every floating tensor is finite; one device sync for all of them."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


class FiniteTraining(L.Callback):
    """A non-finite loss, gradient or weight never reaches a checkpoint.

    `on_non_finite=stop` (the default) raises NonFiniteError naming the step as soon as the loss or a
    gradient is NaN/inf, before the optimizer step, so the weights in memory and in `last.ckpt` are the
    last finite ones. `skip` drops such a step instead (every gradient set to None: the optimizer leaves
    weights and moments untouched, the step counter and the schedule move on) and stops after
    `max_skips` skipped steps in a row. Weights that become non-finite after a step (a finite but huge
    update) stop training under either policy, and any checkpoint whose weights are not finite is
    refused before it is written. Mixed fp16 leaves gradient overflow to its GradScaler."""

    def __init__(self, on_non_finite: str = "stop", max_skips: int = 10):
        if on_non_finite not in ("stop", "skip"):
            raise ValueError(f"on_non_finite must be stop or skip, got {on_non_finite!r} (callbacks.finite.on_non_finite)")
        self.policy, self.max_skips = on_non_finite, max_skips
        self.skipped: list[int] = []  # the steps skipped, in order
        self._in_a_row = 0

    def on_before_backward(self, trainer, module, loss) -> None:
        if self.policy == "stop" and not torch.isfinite(loss).all():
            raise NonFiniteError(f"loss is {loss.item()} at step {trainer.global_step}: training stopped before the "
                                 f"weights changed, so the last checkpoint stays finite; {FIX}")

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 mixed precision: the GradScaler skips overflowing steps itself
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if _finite(p.grad for p in params):
            self._in_a_row = 0
            return
        if self.policy == "stop":
            raise NonFiniteError(f"a gradient is NaN or infinite at step {trainer.global_step}: training stopped before "
                                 f"the weights changed, so the last checkpoint stays finite; {FIX}")
        for p in params:
            p.grad = None  # optimizers pass over parameters without a gradient: no update, no moment change
        self.skipped.append(trainer.global_step)
        self._in_a_row += 1
        rank_zero_warn(f"skipped step {trainer.global_step}: non-finite loss or gradient ({len(self.skipped)} skipped so far)")
        if self._in_a_row >= self.max_skips:
            raise NonFiniteError(f"{self._in_a_row} steps in a row up to step {trainer.global_step} had a non-finite loss "
                                 f"or gradient: training stopped; lower model.lr")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not _finite(p for p in module.parameters() if p.requires_grad):
            raise NonFiniteError(f"weights became NaN or infinite at step {trainer.global_step - 1} (a finite but too "
                                 f"large update): training stopped, the last checkpoint is the last finite one; lower model.lr")

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        bad = [k for k, t in checkpoint.get("state_dict", {}).items() if not _finite([t])]
        if bad:
            raise NonFiniteError(f"refusing to write a checkpoint at step {trainer.global_step}: {len(bad)} tensors are "
                                 f"not finite ({', '.join(bad[:3])}...); the previous checkpoint is kept")

    def state_dict(self) -> dict:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = list(state["skipped"])


class LossCurve(L.Callback):
    """Writes a PNG of train/loss per step and val/loss, val/cider per epoch after every validation."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.train: list[tuple[int, float]] = []
        self.val: dict[str, list[tuple[int, float]]] = {"val/loss": [], "val/cider": []}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.train.append((trainer.global_step, float(loss)))

    def on_validation_epoch_end(self, trainer, module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for key, points in self.val.items():
            if key in trainer.callback_metrics:
                points.append((trainer.global_step, float(trainer.callback_metrics[key])))
        self.draw()

    def draw(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        if self.train:
            steps, losses = zip(*self.train)
            left.plot(steps, losses, lw=0.6, alpha=0.5, label="train/loss")
        if self.val["val/loss"]:
            left.plot(*zip(*self.val["val/loss"]), "o-", label="val/loss")
        left.set(xlabel="step", ylabel="loss", yscale="log")
        left.legend()
        if self.val["val/cider"]:
            right.plot(*zip(*self.val["val/cider"]), "o-", color="C2")
        right.set(xlabel="step", ylabel="val/cider")
        fig.tight_layout()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.path, dpi=100)
        plt.close(fig)


class WandbSamples(L.Callback):
    """After each validation: a W&B table of sample validation images with the predicted caption and the
    references (`CaptionModule.val_samples`). Nothing happens without a WandbLogger (`logger=csv`)."""

    def __init__(self, max_images: int = 8):
        self.max_images = max_images

    def on_validation_end(self, trainer, module) -> None:  # after the module's epoch end set val_samples
        from lightning.pytorch.loggers import WandbLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        samples = getattr(module, "val_samples", None)
        if not loggers or not samples or trainer.sanity_checking or not trainer.is_global_zero:
            return
        import wandb

        datamodule = trainer.datamodule
        paths = {r.image_id: r.path for r in getattr(datamodule, "records", {}).get("val", [])}
        table = wandb.Table(columns=["step", "image_id", "image", "prediction", "references"])
        for image_id, caption, references in samples[: self.max_images]:
            image = wandb.Image(str(paths[image_id])) if image_id in paths else None
            table.add_data(trainer.global_step, image_id, image, caption, " | ".join(references))
        for logger in loggers:
            logger.experiment.log({"val/samples": table, "trainer/global_step": trainer.global_step})
