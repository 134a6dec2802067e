"""The Hub round trip: an export is a Hub model repo (card with the run's scores and config), loads by repo id
from huggingface_hub's cache offline, and is pushed with huggingface_hub's own upload call."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

from captioner.export import export as export_model
from captioner.export import main as export_main
from captioner.train import run
from conftest import ROOT, compose_train


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, data_dir) -> Path:
    """A smoke run that scored its test split (scores.json with scene accuracy beside config.yaml)."""
    out = tmp_path_factory.mktemp("scored") / "run"
    run(compose_train(out, data_dir, ["experiment=smoke", "score=true"]))
    return out


@pytest.fixture(scope="module")
def exported(scored_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "export"
    export_model(scored_run / "checkpoints" / "last.ckpt", out)
    return out


def test_the_model_card_carries_the_runs_scores_config_and_command(scored_run, exported):
    # the pretrained tiny CLIP was a local file: the export carries it as clip.pt
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "clip.pt", "config.json", "model.safetensors", "tokenizer"]
    card = ModelCard.load(exported / "README.md")
    assert card.data.license == "mit" and card.data.pipeline_tag == "image-to-text" and card.data.library_name == "captioner"
    scores = json.loads((scored_run / "scores.json").read_text())
    assert f"| CIDEr | {scores['model']['CIDEr']:.4f} |" in card.text
    assert f"| Bleu_4 | {scores['model']['Bleu_4']:.4f} |" in card.text
    scene = scores["scene"]
    assert f"| scene accuracy | {scene['accuracy']:.4f} ({scene['correct']}/{scene['images']} images) |" in card.text
    assert "python -m captioner.train experiment=smoke score=true" in card.text  # the run's own overrides
    assert "mapper-pixel_shuffle" in card.data.tags and "name=pixel_shuffle, scale_factor=2, num_layers=1" in card.text  # smoke's mapper
    assert "lr: 0.001" in card.text and "The embedded synthetic world" in card.text  # its config and data
    assert "## Limitations" in card.text


def _write_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """`folder` as huggingface_hub lays a downloaded repo out: blobs named by content hash, a snapshot of
    relative symlinks named by commit, and refs/main holding that commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


LOAD = """
import sys
from captioner.api import Captioner
from captioner.data.images import load_image
print(Captioner.from_pretrained(sys.argv[1]).caption(load_image(sys.argv[2])))
"""


def test_an_export_loads_by_repo_id_from_the_hub_cache_offline(exported, tmp_path, data_dir):
    from captioner.api import Captioner
    from captioner.data.images import load_image

    snapshot = _write_hub_cache(tmp_path / "hub", "someone/shapes-captioner", exported)
    image = next((data_dir / "synthetic_smoke" / "images" / "test").glob("*.png"))
    expected = Captioner.from_pretrained(exported).caption(load_image(image))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", LOAD, "someone/shapes-captioner", str(image)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == expected
    assert snapshot.is_dir() and (snapshot / "model.safetensors").is_symlink()

    # a repo that is not in the cache, offline: one line saying what to do, no traceback from the hub
    missing = subprocess.run([sys.executable, "-c", LOAD, "someone/absent", str(image)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0
    assert "FileNotFoundError: someone/absent is neither a local path nor a Hub repo in the cache" in missing.stderr


def test_push_to_hub_uploads_the_export_folder_with_huggingface_hub(scored_run, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw["repo_id"], kw)) or "https://hub/commit/1")
    out = tmp_path / "export"
    # the command as typed (a Hydra app reads sys.argv)
    monkeypatch.setattr(sys, "argv", ["captioner.export", f"ckpt={scored_run / 'checkpoints' / 'last.ckpt'}", f"out={out}",
                                      "push_to_hub=someone/shapes-captioner"])
    export_main()
    (create, repo, create_kw), (upload, upload_repo, upload_kw) = calls
    assert (create, repo, create_kw["exist_ok"]) == ("create_repo", "someone/shapes-captioner", True)
    assert (upload, upload_repo, Path(upload_kw["folder_path"])) == ("upload_folder", "someone/shapes-captioner", out)
    assert 'Captioner.from_pretrained("someone/shapes-captioner")' in (out / "README.md").read_text()  # the card names its repo
    with pytest.raises(ValueError, match="is not a repo id"):
        from captioner.hub_repo import push

        push(out, "not a repo")
