"""What a user is told when a command cannot run: one line (or the whole of a message that lists
files), naming the option to change, and never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def command(*args: str, cwd=ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CAPTIONER_LAUNCH_DIR"}  # the launch directory is `cwd`
    env.update({"HYDRA_FULL_ERROR": "", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the COCO steps")
@pytest.mark.parametrize("entry", ["extract", "train"])
def test_a_gpu_experiment_on_a_machine_without_one_says_so(entry, tmp_path):
    line = _one_error_line(command("-m", f"captioner.{entry}", "experiment=coco_attn", f"paths.data_dir={tmp_path}",
                                   f"hydra.run.dir={tmp_path / 'run'}"))
    assert "needs a GPU" in line and "trainer=cpu" in line, line


def test_missing_coco_names_the_keys_that_point_at_it(tmp_path):
    line = _one_error_line(command("-m", "captioner.extract", "experiment=coco_attn", "trainer=cpu", f"paths.data_dir={tmp_path}",
                                   f"hydra.run.dir={tmp_path / 'run'}"))
    assert "data.splits.{train,val,test}.annotations" in line and "paths.coco_root" in line, line


def test_a_coco_sweep_without_weights_stops_at_its_first_job(tmp_path):
    """27 jobs would each fail the same way: the sweep ends at the first, with the weights' one line."""
    done = command("-m", "captioner.train", "-m", "experiment=coco_attn", "sweep=grid", "trainer=cpu",
                   f"paths.data_dir={tmp_path / 'data'}", cwd=tmp_path)
    line = _one_error_line(done)
    assert "CLIP weights 'ViT-B/32'" in line and "model.encoder=" in line, line
    assert "#0 :" in done.stdout + done.stderr and "#1 :" not in done.stdout + done.stderr


def test_serve_without_a_checkpoint_names_the_option(tmp_path):
    line = _one_error_line(command("-m", "captioner.serve", f"hydra.run.dir={tmp_path}"))
    assert line == "error: ckpt is required: add ckpt=...", line


def test_a_message_that_lists_files_is_printed_whole(tmp_path, monkeypatch, capsys):
    """The error printer of every Hydra entry point keeps the lines after the first (the bad images, the hint)."""
    from captioner.config import hydra_main
    from captioner.data.extraction import BadImagesError

    @hydra_main("extract")
    def task(cfg):
        raise BadImagesError("1 of 1 images could not be read:\n  /d/a.jpg: truncated\nOr set data.bad_images=skip to leave them out.")

    monkeypatch.setattr(sys, "argv", ["extract", f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"])
    monkeypatch.setenv("CAPTIONER_LAUNCH_DIR", str(tmp_path))  # what the entry point sets, undone after the test
    with pytest.raises(SystemExit) as exit_:
        task()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "/d/a.jpg: truncated" in err and "data.bad_images=skip" in err, err


def test_caption_and_export_of_a_missing_checkpoint_are_one_line(tmp_path, capsys, monkeypatch):
    from captioner import caption, export
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert caption.main(["--ckpt", str(tmp_path / "nope.ckpt"), str(tmp_path / "a.png")]) == 2
    assert "nope.ckpt does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        monkeypatch.setattr(sys, "argv", ["captioner.export", f"ckpt={tmp_path / 'nope.ckpt'}"])  # a Hydra app: the command line
        export.main()
    assert exit_.value.code == 2
    assert "nope.ckpt does not exist" in capsys.readouterr().err


def test_import_clipcap_names_its_own_options(tmp_path, monkeypatch, capsys):
    from captioner.import_clipcap import main
    from captioner.pretraining import train_tokenizer
    from test_clipcap_import import clipcap_checkpoint

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "missing.pt"), "--mapper", "mlp", "--clip", "ViT-B/32", "-o", str(tmp_path / "out.ckpt")])
    assert exit_.value.code == 2 and "missing.pt does not exist" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached CLIP
    train_tokenizer(["a red circle above a small blue square", "two green triangles"] * 20, tmp_path / "tok", vocab_size=300)
    clipcap_checkpoint(tmp_path / "mlp.pt", tmp_path / "tok", "mlp", stale=False)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "mlp.pt"), "--mapper", "mlp", "--clip", "ViT-B/32", "--tokenizer", str(tmp_path / "tok"),
              "-o", str(tmp_path / "out.ckpt")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--clip /path/to/ViT-B-32" in err and "model.encoder" not in err, err


def test_clipscore_names_its_own_option(tmp_path, monkeypatch):
    from captioner.clipscore import load_scorer
    from captioner.models.hub import MissingWeightsError

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"clipscore\.model=/path/to/ViT-B-32") as error:
        load_scorer(None, "ViT-B/32")
    assert "model.encoder" not in str(error.value)


def test_a_results_file_that_is_not_json_is_named(tmp_path):
    from PIL import Image

    from captioner.results import load_results

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"a\.png is not JSON .*results=") as error:
        load_results(tmp_path / "a.png")
    assert str(tmp_path / "a.png") in str(error.value)
