"""The CSV log of a run survives its resumption (`ckpt_path=auto` in the same run directory)."""

from __future__ import annotations

import pandas as pd

from captioner.loggers import CSVLogger
from conftest import compose_train


def _log(directory, steps):
    logger = CSVLogger(directory, name="csv", version="")
    for step in steps:
        logger.log_metrics({"train/loss": 10.0 - step}, step=step)
    logger.save()
    return directory / "csv" / "metrics.csv"


def test_a_resumed_run_appends_and_replaces_only_the_steps_it_repeats(tmp_path):
    _log(tmp_path, range(0, 10))  # killed after step 9; its last checkpoint was at step 6
    table = pd.read_csv(_log(tmp_path, range(6, 13)))
    assert list(table["step"]) == list(range(13))
    assert list(table["train/loss"]) == [10.0 - s for s in range(13)]


def test_a_fresh_run_in_the_same_directory_starts_a_fresh_log(tmp_path):
    _log(tmp_path, range(0, 10))
    assert list(pd.read_csv(_log(tmp_path, range(0, 3)))["step"]) == [0, 1, 2]


def test_every_logger_config_writes_the_csv_through_it(tmp_path):
    for logger in ("csv", "default"):
        cfg = compose_train(tmp_path, tmp_path, [f"logger={logger}"])
        assert cfg.logger.csv._target_ == "captioner.loggers.CSVLogger"
