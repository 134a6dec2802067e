"""The run's loggers: Weights & Biases offline unless you have logged in, and without a warning per run;
the CSV log kept across a resumed run."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class _NoAdvert(logging.Filter):
    """Lightning 2.6 advertises its hosted logger whenever a Trainer has no LitLogger; nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip: For seamless cloud logging")


for _name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):  # where rank_zero_info logs
    logging.getLogger(_name).addFilter(_NoAdvert())


def configure_wandb() -> None:
    """Offline unless the user chose a mode or has credentials."""
    if "WANDB_MODE" in os.environ:
        return
    netrc = Path.home() / ".netrc"
    logged_in = "WANDB_API_KEY" in os.environ or netrc.exists() and "api.wandb.ai" in netrc.read_text()
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"


def build_loggers(configs: Mapping | None) -> list[Logger]:
    """The run's loggers from `cfg.logger` (name -> _target_ config), W&B offline unless logged in."""
    configure_wandb()
    return [instantiate(c) for c in (configs or {}).values()]


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, minus the `anonymous=None` it always hands to `wandb.init`: wandb has
    retired that setting and warns whenever it is passed at all. `anonymous=True` is still passed on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # Lightning 2.6 keeps wandb.init's arguments here
            self._wandb_init.pop("anonymous", None)


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing `metrics.csv` is kept: a run resumed in its own
    directory (`ckpt_path=auto`) appends to it, its first rows replacing those of the steps it repeats
    (logged after the checkpoint it resumes from). A fresh run in the directory starts at step 0 and so
    replaces every row."""

    def _check_log_dir_exists(self) -> None:
        self._kept = []
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                self._kept = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        if self._kept is not None and self.metrics:
            first = min(m["step"] for m in self.metrics)
            earlier = [row for row in self._kept if row.get("step") and float(row["step"]) < first]
            self._kept = None
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                    writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                    writer.writeheader()
                    writer.writerows(earlier)
        super().save()


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger whose `metrics.csv` survives a resumed run (see _ResumingWriter)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ResumingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment
