"""Every tower source through the whole path at smoke size: extract -> train -> evaluate -> caption, with the
tower saved as a user has it (tests/towers_saved.py)."""

from __future__ import annotations

import json

import pytest
from omegaconf import open_dict

from conftest import compose_app, compose_train, pretrained
from test_towers import towers  # noqa: F401 - the session's saved towers

PIPELINE = [  # each tower and the layer its mapper reads
    ("open_clip_vit", -1),
    ("open_clip_siglip", -1),
    ("transformers_clip", -2),
    ("transformers_siglip", 0),
    ("transformers_clip_vision", -1),  # no text tower: CLIPScore says why it is missing
]
SMOKE = ["experiment=smoke", "pretrain.clip=null", "data.synthetic.sizes.train=32", "data.synthetic.sizes.val=8",
         "data.synthetic.sizes.test=8", "model.val_cider_images=4"]


def _with_encoder(cfg, spec):
    with open_dict(cfg):
        cfg.model.encoder = spec
    return cfg


@pytest.mark.parametrize(("kind", "layer"), PIPELINE)
def test_each_tower_extracts_trains_evaluates_and_captions(kind, layer, towers, tmp_path, capsys):  # noqa: F811
    from captioner.caption import main as caption
    from captioner.evaluate import run as evaluate
    from captioner.extract import run as extract
    from captioner.train import run as train
    from test_evaluate import compose_eval

    spec = {**towers[kind], "layer": layer}
    data = tmp_path / "data"
    stores = extract(_with_encoder(compose_app("extract", tmp_path / "extract", data, SMOKE), spec))
    manifest = json.loads((stores["train"] / "manifest.json").read_text())
    assert manifest["encoder"] == spec and manifest["encoder_sha256"]  # the whole spec, and the weights' hash
    capsys.readouterr()

    cfg = _with_encoder(pretrained(compose_train(tmp_path / "run", data, [*SMOKE, "score=false"])), spec)
    train(cfg)
    assert "written" not in capsys.readouterr().out  # training opened the extracted stores
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"

    out = tmp_path / "eval"
    evaluate(compose_eval(out, [f"ckpt_path={ckpt}", "meteor=false", "decoding.strategy=greedy", "decoding.max_new_tokens=8"]))
    scores = json.loads((out / "scores.json").read_text())
    assert len(json.loads((out / "captions_test.json").read_text())) == 8
    assert "CIDEr" in json.dumps(scores["model"])
    if kind.endswith("vision"):
        assert "clipscore" not in scores and "no text tower" in scores["unavailable"]["CLIPScore"]
    else:
        assert "CLIPScore" in scores["clipscore"]["model"]  # scored with the tower's own text part

    images = sorted((data / "synthetic_smoke").rglob("*.png"))[:2]
    assert images
    rows = tmp_path / "captions.jsonl"
    assert caption([*map(str, images), "--ckpt", str(ckpt), "--max-new-tokens", "8", "-o", str(rows)]) == 0
    assert len(rows.read_text().splitlines()) == 2
