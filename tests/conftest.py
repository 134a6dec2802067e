"""Test fixtures: the real Hydra configs, composed with tiny sizes and generated data; no network."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

import captioner.config  # noqa: E402,F401 - the run_id resolver and the config schemas (ConfigStore)


def compose_train(output_dir: Path, data_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The real `conf/train.yaml`, composed as `python -m captioner.train` would, run dir in `output_dir`."""
    return compose_app("train", output_dir, data_dir, overrides)


def compose_app(config_name: str, output_dir: Path, data_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The real `conf/<config_name>.yaml`, composed as its entry point would, run dir in `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
        cfg.paths.data_dir = str(data_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One generated-data folder for the session: datasets and feature stores are made once."""
    return tmp_path_factory.mktemp("data")


def pretrained(cfg: DictConfig) -> DictConfig:
    """`cfg` after its data and pretraining caches exist (what `captioner.train` builds first), so that
    `instantiate(cfg.model)` finds the pretrained tiny CLIP, GPT-2 and tokenizer."""
    from omegaconf import OmegaConf

    from captioner.data.synthetic import write_dataset
    from captioner.pretraining import prepare

    if cfg.data.get("synthetic"):
        write_dataset(**OmegaConf.to_container(cfg.data.synthetic, resolve=True))
    prepare(cfg.get("pretrain"))
    return cfg


@pytest.fixture
def smoke_cfg(tmp_path, data_dir):
    def make(*overrides: str) -> DictConfig:
        return pretrained(compose_train(tmp_path / "run", data_dir, ["experiment=smoke", *overrides]))

    return make


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    path = SHARED_DATA / "coco_mini"
    if not path.is_dir():
        pytest.skip("../shared/data/coco_mini is not present")
    return path


@pytest.fixture(scope="session")
def embedded_ckpt(tmp_path_factory, data_dir) -> Path:
    """A checkpoint of the embedded recipe with the attention mapper (the bridge that returns maps, for
    the overlays) after a seconds-long smoke run, made once per session for the API, web, CLI, browser
    and notebook tests."""
    from captioner.train import run

    out = tmp_path_factory.mktemp("embedded_ckpt")
    run(compose_train(out / "run", data_dir, ["experiment=smoke", "score=false", "model/mapper=attention"]))
    return out / "run" / "checkpoints" / "last.ckpt"


# What `distinct_ckpt` changes in the smoke run, so that its captions follow the image: 400 training
# scenes, not 64 (a CLIP and a mapper that saw 64 scenes only tell those apart); a CLIP whose towers
# agree (120 contrastive steps, not 4) and a caption LM (100 steps); two caption epochs (250 steps) at a
# rate that rises within the first 10 steps (the default warms up for 200). The steps, not the data,
# cost the time. No time cap: a loaded machine must not cut the run short. The attention mapper (its maps feed
# the overlay tests) reads the tower's last block: after 120 contrastive steps its tokens tell these scenes
# apart, the first block's (the default's) not yet.
DISTINCT = [
    "experiment=smoke", "score=false", "trainer.max_time=null", "model.encoder=${pretrain.clip.out}/clip.pt", "model/mapper=attention",
    "data.synthetic.root=${paths.data_dir}/synthetic_distinct", "data.synthetic.sizes.train=400",
    "pretrain.clip.steps=120", "pretrain.clip.batch_size=64", "pretrain.clip.warmup_steps=10", "pretrain.clip.val_every=120",
    "pretrain.lm.steps=100", "pretrain.lm.warmup_steps=10", "pretrain.lm.val_every=100",
    "pretrain.lm.captions_per_text=1",  # one caption a text: 100 LM steps of two-caption texts leave this budget's captions alike
    "trainer.max_epochs=2", "model.lr=3e-3", "model.warmup_steps=10", "model.val_cider_images=4",
]


@pytest.fixture(scope="session")
def distinct_ckpt(tmp_path_factory, data_dir) -> Path:
    """A smoke-sized checkpoint whose captions differ between clearly different images, for the tests
    that compare captions of different images (API, web, CLI) and CLIPScore: ~35 s of CPU, ~20 s on
    the shared 2-core machine (`embedded_ckpt`: ~4 s). Its data and pretraining caches are its own."""
    from captioner.train import run

    out = tmp_path_factory.mktemp("distinct_ckpt")
    run(compose_train(out / "run", data_dir, DISTINCT))
    return out / "run" / "checkpoints" / "last.ckpt"


def scenes(*names: str, size: int = 64):
    """Rendered embedded-default scenes (captioner/data/synthetic.py) that any captioner of them must tell
    apart: `large red circle`, `large blue square left`, `small yellow triangle top`, `row of three`,
    `green above red`."""
    import random

    from captioner.data.synthetic import Thing, render

    known = {
        "large red circle": [Thing("circle", "red", "large", 0.5, 0.5)],
        "large blue square left": [Thing("square", "blue", "large", 0.22, 0.5)],
        "small yellow triangle top": [Thing("triangle", "yellow", "small", 0.5, 0.22)],
        "row of three": [Thing("triangle", "green", "small", 0.18, 0.5), Thing("diamond", "yellow", "small", 0.5, 0.5),
                         Thing("circle", "purple", "small", 0.82, 0.5)],
        "green above red": [Thing("square", "green", "large", 0.5, 0.27), Thing("circle", "red", "large", 0.5, 0.73)],
    }
    return [render(known[name], size, random.Random(0)) for name in names]
