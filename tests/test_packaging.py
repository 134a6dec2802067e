"""A non-editable install is complete: every package and the configs go into the wheel, and the
installed copy trains the smoke run from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT


def test_the_package_list_names_every_package_and_the_configs():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "captioner").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"captioner.conf"}
    assert setuptools["package-dir"] == {"captioner.conf": "conf"}
    assert {"*.yaml", "**/*.yaml"} <= set(setuptools["package-data"]["captioner.conf"])


@pytest.mark.slow
def test_a_non_editable_install_into_a_fresh_venv_trains_the_smoke_run(tmp_path):
    """`pip install .` (no -e) into a new venv, then `python -m captioner.train experiment=smoke` in an empty
    folder: the configs come from the installed package, not from this checkout. The venv borrows this
    environment's dependencies through a .pth line (no download), never its captioner."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "venv" / site.removeprefix(str(venv) + "/") / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(CAPTIONER_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    source = tmp_path / "clone"  # the checkout's files without anything a build or a run left behind
    left_behind = {".git", "build", "captioner.egg-info", ".venv", "outputs", "data", "site", "multirun", ".pytest_cache"}
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [n for n in names if n == "__pycache__"
                                                                or Path(folder) == ROOT and n in left_behind])
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed",
                              str(source)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([python, "-c", "import captioner.config as c; print(c.__file__); print(c.CONF_DIR)"],
                           cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    module, conf = where.stdout.split()
    assert module.startswith(site) and conf == os.path.join(site, "captioner", "conf"), where.stdout + where.stderr
    done = subprocess.run([python, "-m", "captioner.train", "experiment=smoke"],  # as a user types it
                          cwd=work, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((work / "outputs" / "smoke" / "runs").iterdir())  # outputs/ beside where it was started
    assert len(runs) == 1 and (runs[0] / "captions_test.json").is_file() and (runs[0] / "scores.json").is_file(), runs
