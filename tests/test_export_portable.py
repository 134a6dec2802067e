"""An export is a directory to share: it names no path of the run that made it, and a copy of it
captions on another machine (here: another path, with the training run's data gone)."""

from __future__ import annotations

import json
import os
import shutil
import stat

from captioner.api import Captioner
from captioner.export import export
from captioner.train import run
from conftest import compose_train, scenes


def test_a_copied_export_captions_after_the_run_and_its_data_are_gone(tmp_path):
    data, run_dir = tmp_path / "data", tmp_path / "run"
    run(compose_train(run_dir, data, ["experiment=smoke", "debug=limit", "score=false"]))
    images = scenes("large red circle", "row of three")
    expected = Captioner.from_pretrained(run_dir / "checkpoints" / "last.ckpt").caption(images)
    out = export(run_dir / "checkpoints" / "last.ckpt", tmp_path / "export")
    config = (out / "config.json").read_text()
    for gone in (str(tmp_path), str(data)):
        assert gone not in config, json.loads(config)["hyper_parameters"]
    assert stat.S_IMODE(os.stat(out / "model.safetensors").st_mode) == 0o666 & ~_umask()
    elsewhere = tmp_path / "elsewhere" / "model"
    shutil.copytree(out, elsewhere)
    shutil.rmtree(data)  # the pretrained CLIP and GPT-2 files the run loaded
    shutil.rmtree(out)
    assert Captioner.from_pretrained(elsewhere).caption(images) == expected


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
