"""Hydra sweeps from conf/sweep/: a grid multirun and Optuna trials, summarised by val/cider."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import CONF, ROOT, compose_train

# every job: the smoke model, two training batches, one validation batch, no test scoring
TINY = ["experiment=smoke", "debug=limit", "score=false", "model.val_cider_images=4", "logger=csv"]


def _multirun(sweep_dir, data_dir, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "captioner.train", "-m", *TINY, f"paths.data_dir={data_dir}",
               f"hydra.sweep.dir={sweep_dir}", *overrides]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_grid_sweep_run_two_at_a_time_has_a_summary_row_per_job_sorted_by_val_cider(tmp_path, data_dir):
    sweep = tmp_path / "grid"
    # the command line replaces conf/sweep/grid.yaml's rows with tiny values: 2 x 2 x 1 = 4 jobs,
    # two side by side (hydra/launcher=local: joblib processes), one torch thread each
    _multirun(sweep, data_dir, "sweep=grid", "model.prefix_length=4,8", "model.mapper.num_layers=1,2", "data.noise.rate=0.1",
              "hydra/launcher=local", "threads=1")
    launcher = OmegaConf.load(sweep / "multirun.yaml").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2
    table = pd.read_csv(sweep / "summary.csv")
    assert len(table) == 4
    assert sorted(zip(table["model.prefix_length"], table["model.mapper.num_layers"])) == [(4, 1), (4, 2), (8, 1), (8, 2)]
    assert table["val/cider"].notna().all()
    assert list(table["val/cider"]) == sorted(table["val/cider"], reverse=True)
    for _, row in table.iterrows():  # each row's values are that job's own config and score
        job = OmegaConf.load(sweep / str(row["job"]) / "config.yaml")
        assert job.model.prefix_length == row["model.prefix_length"] and job.model.mapper.num_layers == row["model.mapper.num_layers"]
        assert job.threads == 1
        assert json.loads((sweep / str(row["job"]) / "metrics.json").read_text())["val/cider"] == row["val/cider"]
    markdown = (sweep / "summary.md").read_text().splitlines()
    assert markdown[0].startswith("| job | model.prefix_length | model.mapper.num_layers | data.noise.rate | val/cider")
    assert len(markdown) == 2 + 4
    assert (sweep / "summary.png").stat().st_size > 0


def test_optuna_sweep_runs_three_trials_maximising_val_cider(tmp_path, data_dir):
    sweep = tmp_path / "optuna"
    done = _multirun(sweep, data_dir, "sweep=optuna", "hydra.sweeper.n_trials=3",
                     "model.prefix_length=choice(4,8)", "model.mapper.num_layers=choice(1,2)")
    assert "Best value" in done.stdout + done.stderr
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.name == "optuna"
    table = pd.read_csv(sweep / "summary.csv")
    assert len(table) == 3 and table["val/cider"].notna().all()
    assert results.best_value == max(table["val/cider"])


def test_the_sweep_configs_hold_the_papers_values(tmp_path):
    grid = compose_train(tmp_path, tmp_path, ["sweep=grid"]).hydra.sweeper.params
    assert "40" in grid["model.prefix_length"].split(",") and "8" in grid["model.mapper.num_layers"].split(",")
    assert "0.1" in grid["data.noise.rate"].split(",")
    optuna = compose_train(tmp_path, tmp_path, ["sweep=optuna"]).hydra.sweeper
    assert optuna.direction == "maximize" and "40" in optuna.params["model.prefix_length"]
    slurm = compose_train(tmp_path, tmp_path, ["sweep=grid", "hydra/launcher=slurm"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.max_num_timeout > 0


def test_two_runs_started_in_the_same_second_get_different_directories(tmp_path):
    a, b = (compose_train(tmp_path, tmp_path, []).hydra.run.dir for _ in range(2))
    stamp = r".*/runs/(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)_([0-9a-f]{6})$"
    (time_a, id_a), (time_b, id_b) = re.match(stamp, a).groups(), re.match(stamp, b).groups()
    assert id_a != id_b and a != b  # even when time_a == time_b: the random id tells them apart


@pytest.mark.parametrize("debug", sorted(p.stem for p in (CONF / "debug").glob("*.yaml")))
def test_every_debug_config_sets_its_flags_over_the_experiment(debug, tmp_path):
    """What a debug config sets reaches the Trainer as it says, whatever the experiment and budget set."""
    own = OmegaConf.load(CONF / "debug" / f"{debug}.yaml")
    for experiment in ("smoke", "coco_attn"):
        cfg = compose_train(tmp_path, tmp_path, [f"experiment={experiment}", f"debug={debug}"])
        assert cfg.task_name == "debug"
        for key, value in own.trainer.items():
            assert cfg.trainer[key] == value, (experiment, key)
        if "score" in own:
            assert cfg.score == own.score
        assert cfg.trainer._target_ == "lightning.Trainer"


def _as_typed(cwd, data_dir, *overrides: str) -> subprocess.CompletedProcess:
    """A multirun as the README types it: no hydra.sweep.dir, so the sweep directory is resolved from
    the directory the command starts in (here `cwd`, whose outputs/ receives it) before any job exists."""
    command = [sys.executable, "-m", "captioner.train", "-m", *TINY, f"paths.data_dir={data_dir}", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "CAPTIONER_LAUNCH_DIR"}  # the launch directory is `cwd`
    done = subprocess.run(command, cwd=cwd, env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_multirun_without_a_sweep_dir_writes_its_summary(tmp_path, data_dir):
    _as_typed(tmp_path, data_dir, "model.prefix_length=4,8")
    summaries = list((tmp_path / "outputs").glob("*/multiruns/*/summary.md"))
    assert len(summaries) == 1 and len(summaries[0].read_text().splitlines()) == 2 + 2


@pytest.mark.parametrize("sweep,one_job", [
    ("ablation", ["model/mapper=mlp", "model.freeze_decoder=true", "data.noise.variance=0.0"]),
    ("grid", ["model.prefix_length=4", "model.mapper.num_layers=1", "data.noise.rate=0.1"]),
])
def test_the_sweep_files_start_their_jobs_as_typed(sweep, one_job, tmp_path, data_dir):
    """`-m sweep=...` with each swept key pinned on the command line (a command-line row wins): one job."""
    _as_typed(tmp_path, data_dir, f"sweep={sweep}", *one_job)
    jobs = list((tmp_path / "outputs").glob("*/multiruns/*/0/metrics.json"))
    assert len(jobs) == 1 and "val/cider" in json.loads(jobs[0].read_text())
