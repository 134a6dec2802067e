"""The Makefile: every target it declares has a recipe, and `make clean` keeps what training made."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import ROOT

MAKEFILE = (ROOT / "Makefile").read_text()


def test_every_declared_target_has_a_recipe():
    phony = re.search(r"^\.PHONY:(.*)$", MAKEFILE, re.M).group(1).split()
    assert phony and all(re.search(rf"^{target}:", MAKEFILE, re.M) for target in phony), phony


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_clean_removes_caches_and_keeps_trained_runs(tmp_path):
    checkpoint = tmp_path / "outputs" / "train" / "runs" / "r" / "checkpoints" / "last.ckpt"
    store = tmp_path / "data" / "synthetic" / "features" / "train-x" / "clip_features.npy"
    for path in (checkpoint, store, tmp_path / ".pytest_cache" / "v", tmp_path / "captioner" / "__pycache__" / "a.pyc"):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    done = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "clean"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert checkpoint.is_file() and store.is_file()
    assert not (tmp_path / ".pytest_cache").exists() and not (tmp_path / "captioner" / "__pycache__").exists()
    assert "kept outputs/" in done.stdout
