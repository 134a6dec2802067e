"""Safe sharing: safetensors export that rebuilds the same model; pickles that would run code are refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from captioner.checkpoint import UnsafeCheckpointError, load_module, read_checkpoint
from captioner.export import export as export_model
from captioner.train import run
from conftest import compose_train

# a pickle whose loading runs `touch MARKER`: what a booby-trapped checkpoint from a stranger does
CRAFT = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": Payload()}, sys.argv[1])
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("trained")
    cfg = compose_train(out, data_dir, ["experiment=smoke", "debug=limit", "score=false"])
    run(cfg)
    return out / "checkpoints" / "last.ckpt", cfg


def test_exported_model_reloads_and_captions_identically(trained, tmp_path):
    ckpt, cfg = trained
    export_model(ckpt, tmp_path / "export")
    export = tmp_path / "export"
    # the pretrained tiny CLIP was a local file: the export carries it; README.md is the model card
    assert sorted(p.name for p in export.iterdir()) == ["README.md", "clip.pt", "config.json", "model.safetensors", "tokenizer"]
    config = json.loads((export / "config.json").read_text())
    assert config["hyper_parameters"]["mapper"]["name"] == "pixel_shuffle" and config["global_step"] == 2
    weights = load_file(export / "model.safetensors")
    assert "model.decoder.lm_head.weight" not in weights and "model.decoder.transformer.wte.weight" in weights  # tied: once

    original, exported = load_module(ckpt), load_module(export)
    for name, value in original.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value, rtol=0, atol=0, msg=name)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    captions = original.caption_features(batch)
    assert captions == exported.caption_features(batch) and len(captions) == len(batch["image_id"])


def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_nothing_runs(trained, tmp_path, data_dir, capsys):
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "marker"
    subprocess.run([sys.executable, "-c", CRAFT, str(evil), str(marker)], check=True)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system|refusing"):
        load_module(evil)
    with pytest.raises(UnsafeCheckpointError):
        export_model(evil, tmp_path / "export")
    # resuming training from it goes through the same refusal (AtomicCheckpointIO.load_checkpoint)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        run(compose_train(tmp_path / "run", data_dir, ["experiment=smoke", "debug=limit", f"ckpt_path={evil}"]))
    assert not marker.exists()
    assert not (tmp_path / "export").exists()
    assert read_checkpoint(trained[0])["global_step"] == 2  # our own checkpoints pass the same check


def test_a_copied_checkpoint_captions_with_the_data_folder_deleted(tmp_path):
    import shutil

    from captioner.api import Captioner
    from captioner.data.images import load_image

    data = tmp_path / "data"  # this run's own data/: the embedded dataset, its tokenizer and pretrained CLIP and GPT-2
    run(compose_train(tmp_path / "run", data, ["experiment=smoke", "score=false"]))
    tokenizer_dir = data / "synthetic_smoke" / "features" / "pretrained" / "tokenizer"  # with the pretrained CLIP and GPT-2
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["hyper_parameters"]["tokenizer"] == str(tokenizer_dir)
    image = load_image(next((data / "synthetic_smoke" / "images" / "test").glob("*.png")))
    expected = Captioner.from_pretrained(tmp_path / "run" / "checkpoints" / "last.ckpt").caption(image)

    elsewhere = tmp_path / "elsewhere" / "model.ckpt"
    elsewhere.parent.mkdir()
    shutil.copy(tmp_path / "run" / "checkpoints" / "last.ckpt", elsewhere)
    shutil.rmtree(data)
    shutil.rmtree(tmp_path / "run")
    assert not tokenizer_dir.exists()
    assert Captioner.from_pretrained(elsewhere).caption(image) == expected
