"""Untrusted checkpoints and exports: a file they name is never loaded with torch.jit.load, a config's sizes
are checked against the weights before anything is allocated, and carried files live in a private directory."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
import torch

from captioner.checkpoint import UnsafeCheckpointError, load_module, read_checkpoint
from captioner.export import export
from test_export import trained  # noqa: F401 - a module-scoped fixture: a smoke run's last.ckpt


@pytest.fixture
def exported(trained, tmp_path):  # noqa: F811
    return export(trained[0], tmp_path / "export")


def _edit_config(export_dir, **hparams) -> None:
    config = json.loads((export_dir / "config.json").read_text())
    config["hyper_parameters"].update(hparams)
    (export_dir / "config.json").write_text(json.dumps(config))


def test_a_config_asking_for_2000_layers_is_refused_before_anything_is_allocated(exported, trained, tmp_path, monkeypatch):  # noqa: F811
    from transformers import GPT2LMHeadModel

    built = []
    real_init = GPT2LMHeadModel.__init__
    monkeypatch.setattr(GPT2LMHeadModel, "__init__", lambda self, config, *a, **k: (built.append(config.n_layer), real_init(self, config, *a, **k))[1])
    _edit_config(exported, decoder={"n_layer": 2000, "n_embd": 64, "n_head": 2})
    with pytest.raises(ValueError, match=r"config does not match its weights, refusing to build it: decoder.n_layer=2000 but the weights hold \d+ layers"):
        load_module(exported)
    assert built == []  # not even on the meta device

    checkpoint = read_checkpoint(trained[0])
    checkpoint["hyper_parameters"]["decoder"] = {"n_layer": 1, "n_embd": 4096, "n_head": 2}  # 1 layer, but each one huge
    torch.save(checkpoint, tmp_path / "wide.ckpt")
    with pytest.raises(ValueError, match=r"decoder.transformer.wte.weight: \(\d+, 64\) in the weights, \(\d+, 4096\) in the config"):
        load_module(tmp_path / "wide.ckpt")
    assert built == [1] and load_module(trained[0]) is not None  # built on meta only; our own checkpoints pass


def test_a_torchscript_encoder_named_by_an_export_is_never_jit_loaded(exported, tmp_path, monkeypatch):
    scripted = tmp_path / "encoder.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    _edit_config(exported, encoder=str(scripted))
    loaded = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loaded.append(a) or pytest.fail("torch.jit.load was called"))
    with pytest.raises(UnsafeCheckpointError, match=r"names the encoder .*encoder.pt, a TorchScript file, which runs code"):
        load_module(exported)
    assert loaded == []


def test_carried_tokenizer_files_live_in_a_private_directory_and_planted_content_is_replaced(tmp_path, monkeypatch):
    import tempfile

    from captioner.models.decoder import write_tokenizer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    files = {"vocab.json": '{"a": 0, "<|endoftext|>": 1}', "merges.txt": "#version: 0.2\n"}
    directory = write_tokenizer(files)
    assert directory.parent.parent.name.startswith("captioner-") and stat.S_IMODE(directory.parent.parent.stat().st_mode) == 0o700
    (directory / "vocab.json").write_text('{"planted": 0}')  # what another process left under the same name
    assert (write_tokenizer(files) / "vocab.json").read_text() == files["vocab.json"]

    shutil.rmtree(directory.parent.parent)
    (tmp_path / directory.parent.parent.name).mkdir(mode=0o777)  # someone else's, or anyone's to write into
    (tmp_path / directory.parent.parent.name).chmod(0o777)
    with pytest.raises(PermissionError, match="is not a private directory of this user"):
        write_tokenizer(files)


def test_a_torchscript_clip_the_user_names_loads_from_every_entry_point(trained, tmp_path):  # noqa: F811
    """A run trained on OpenAI's TorchScript file (as OpenAI ships CLIP) names that file: it is refused on the
    checkpoint's word, and loads when the user names it (`encoder=`, `--encoder`), with the same captions."""
    import subprocess
    import sys

    import clip

    from captioner.api import Captioner
    from captioner.models.encoder import clip_name, load_clip, renamed
    from conftest import ROOT

    checkpoint = read_checkpoint(trained[0])
    model = load_clip(clip_name(checkpoint["hyper_parameters"]["encoder"])).eval()
    pixels = torch.zeros(1, 3, model.visual.input_resolution, model.visual.input_resolution)
    tokens = clip.tokenize(["a shape"], context_length=model.context_length)
    scripted = tmp_path / "ViT-tiny.pt"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, (pixels, tokens), check_trace=False), str(scripted))
    checkpoint["hyper_parameters"]["encoder"] = renamed(checkpoint["hyper_parameters"]["encoder"], str(scripted))
    torch.save(checkpoint, tmp_path / "scripted.ckpt")

    with pytest.raises(UnsafeCheckpointError, match=rf"encoder={scripted} \(evaluate, serve\), --encoder {scripted} \(caption\)"):
        Captioner.from_pretrained(tmp_path / "scripted.ckpt")
    image = tmp_path / "scene.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
    expected = Captioner.from_pretrained(trained[0]).caption(str(image))
    done = subprocess.run([sys.executable, "-m", "captioner.caption", "--ckpt", str(tmp_path / "scripted.ckpt"),
                           "--encoder", str(scripted), str(image)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and expected in done.stdout, done.stdout + done.stderr[-2000:]
