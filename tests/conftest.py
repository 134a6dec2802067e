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
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
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
    """A checkpoint of the embedded default (attention mapper) after a seconds-long smoke run, made
    once per session for the API, web, CLI, browser and notebook tests."""
    from captioner.train import run

    out = tmp_path_factory.mktemp("embedded_ckpt")
    run(compose_train(out / "run", data_dir, ["experiment=smoke", "score=false"]))
    return out / "run" / "checkpoints" / "last.ckpt"
