"""Every registered bridge trains on the miniature through the real training entry (`experiment=smoke`)
and captions; the API and the web page show attention maps for a bridge that returns them and say so
for one that does not; text-only training refuses a patch-token bridge."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from hydra.utils import instantiate

from captioner.api import Captioner
from captioner.models.registry import MAPPERS
from captioner.train import run
from captioner.web.app import Limits, create_app
from captioner.web.identity import describe_model
from conftest import ROOT, compose_train, pretrained, scenes
from test_serve import serving

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """name -> (checkpoint, the model before training): each bridge after a smoke run, made on first use."""
    made: dict[str, tuple[Path, dict]] = {}

    def train(name: str) -> tuple[Path, dict]:
        if name not in made:
            out = tmp_path_factory.mktemp(f"bridge_{name}")
            cfg = pretrained(compose_train(out / "run", data_dir, ["experiment=smoke", "score=false", f"model/mapper={name}"]))
            initial = {k: v.clone() for k, v in instantiate(cfg.model).mapper.state_dict().items()}  # the same seed as the run's
            run(cfg)
            made[name] = (out / "run" / "checkpoints" / "last.ckpt", initial)
        return made[name]

    return train


@pytest.mark.parametrize("name", sorted(MAPPERS))
def test_every_bridge_trains_through_the_entry_point_and_captions(name, trained):
    path, initial = trained(name)
    captioner = Captioner.from_pretrained(path, prepacked=False)
    mapper = captioner.model.mapper
    assert mapper.name == name and captioner.module.hparams.mapper["name"] == name
    changed = [k for k, v in mapper.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "no mapper weight moved: the training steps did not reach the bridge"
    grid = captioner.model.encoder.num_tokens
    expected = {"mlp2x_gelu": grid, "pixel_shuffle": grid // 4}.get(name, 8)  # token-for-token | conf/model/tiny.yaml's 8 slots
    assert captioner.module.hparams.prefix_length == captioner.model.prefix_length == expected
    assert captioner.max_new_tokens == captioner.model.decoder.config.n_positions - expected
    images = scenes("large red circle", "row of three")
    results = captioner.describe(images, attention=True, max_new_tokens=12)
    assert all(isinstance(r.text, str) and r.text for r in results)
    assert Captioner.from_pretrained(path).caption(images, max_new_tokens=12) == [r.text for r in results]  # prepacked where it can
    assert captioner.has_attention == type(mapper).returns_attention
    for r in results:
        assert (r.attention is not None) == captioner.has_attention
        if r.attention is not None:
            g = round(grid**0.5)
            assert r.attention.shape == (expected, g, g)


@pytest.mark.parametrize("name", ["attention", "mlp2x_gelu"])
def test_the_service_sends_maps_only_for_a_bridge_that_returns_them(name, trained):
    path, _ = trained(name)
    captioner = Captioner.from_pretrained(path, prepacked=False)
    with serving(create_app(captioner, Limits(), model=describe_model(path))) as url:
        health = httpx.get(url + "/healthz").json()
        files = {"images": ("a.png", png(scenes("green above red")[0]), "image/png")}
        result = httpx.post(url + "/v1/captions", params={"attention": True}, files=files, timeout=60).json()["results"][0]
    assert health["attention"] is MAPPERS[name].returns_attention and health["model"]["mapper"] == name
    assert ("attention" in result) is MAPPERS[name].returns_attention and result["caption"]


def png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.browser
@pytest.mark.parametrize("name", ["attention", "mlp2x_gelu"])
def test_the_page_overlays_maps_or_says_there_are_none(name, trained):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent: apt-get install chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    from test_browser import ARGS

    path, _ = trained(name)
    captioner = Captioner.from_pretrained(path, prepacked=False)
    image = Path(path).parent / "scene.png"
    scenes("row of three", size=96)[0].save(image)
    with serving(create_app(captioner, Limits(), model=describe_model(path))) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("() => document.getElementById('model').textContent.includes('mapper')", timeout=30_000)
            page.set_input_files("#file", str(image))
            page.wait_for_function("() => { const t = document.getElementById('caption').textContent;"
                                   " return t && !t.startsWith('captioning'); }", timeout=60_000)
            note, slots = page.locator("#attention-note"), page.locator("#slots button")
            if MAPPERS[name].returns_attention:
                assert not note.is_visible() and page.locator("#attention").is_visible()
                assert slots.count() == captioner.model.prefix_length + 1  # "all" and one per slot
            else:
                assert note.is_visible() and not page.locator("#attention").is_visible() and slots.count() == 0
                assert note.text_content() == f"no attention overlay: this model's mapper ({name}) returns no attention maps"
        finally:
            browser.close()


def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner.train", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_bridge_is_one_override_on_the_command_line(data_dir, tmp_path, trained):
    trained("mlp2x_gelu")  # the smoke data and pretraining caches exist: the command reuses them
    done = command("experiment=smoke", "score=false", "model/mapper=mlp2x_gelu", "model.mapper.num_layers=2",
                   f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    module = Captioner.from_pretrained(tmp_path / "checkpoints" / "last.ckpt", prepacked=False).module
    assert module.hparams.mapper == {"name": "mlp2x_gelu", "num_layers": 2} and len(module.mapper.projector) == 3


def test_a_scale_factor_that_does_not_divide_the_grid_is_one_line(data_dir, tmp_path, trained):
    trained("pixel_shuffle")
    done = command("experiment=smoke", "model/mapper=pixel_shuffle", "model.mapper.scale_factor=3",
                   f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}")
    lines = [line for line in done.stderr.splitlines() if line.strip() and line != "Seed set to 0"]  # Lightning's seed line
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0] == "error: model.mapper.scale_factor=3 does not divide the encoder's 4x4 patch grid: use one of 1, 2, 4"


def test_text_only_training_refuses_a_patch_token_bridge(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("text_only_bridge")
    cfg = pretrained(compose_train(tmp_path / "run", root, ["experiment=[smoke,text_only]", "model/mapper=mlp2x_gelu"]))
    datamodule = instantiate(cfg.data)
    datamodule.trainer = SimpleNamespace(lightning_module=instantiate(cfg.model), world_size=1)
    with pytest.raises(ValueError) as refused:
        datamodule.setup("fit")
    assert str(refused.value) == ("text-only training gives CLIP text embeddings (clip_features), but the mlp2x_gelu mapper "
                                  "reads patch_tokens: use model/mapper=mlp or model/mapper=transformer")


def test_a_prefix_the_decoder_cannot_hold_is_one_line(smoke_cfg):
    from captioner.models.caption_model import CaptionModel

    cfg = smoke_cfg()
    small = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 16}  # the tiny CLIP's 16 patch tokens fill it
    with pytest.raises(ValueError) as refused:
        CaptionModel(cfg.model.encoder, small, cfg.model.tokenizer, {"name": "mlp2x_gelu"}, prefix_length=8)
    assert str(refused.value) == ("the mlp2x_gelu mapper's prefix of 16 embeddings leaves no room for a caption in the "
                                  "decoder's 16 positions: choose a shorter prefix or a decoder with more positions")
    model = CaptionModel(cfg.model.encoder, {**small, "n_positions": 20}, cfg.model.tokenizer, {"name": "pixel_shuffle"}, prefix_length=8)
    assert model.prefix_length == 4 and model.max_new_tokens == 16
