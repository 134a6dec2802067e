"""Weights & Biases for training runs: offline unless you have logged in, and without a warning per run."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
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
