"""The training entry point, composed from the real configs."""

from __future__ import annotations

import json
import time

import pytest
import torch
from hydra.utils import get_class, instantiate

from captioner.checkpoint import read_checkpoint
from captioner.config import check
from captioner.data.datamodule import CaptionDataModule
from captioner.models.hub import MissingWeightsError
from captioner.module import CaptionModule
from captioner.train import run
from conftest import CONF, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_config_composes(experiment, tmp_path):
    cfg = compose_train(tmp_path / "run", tmp_path / "data", [f"experiment={experiment}"])
    assert issubclass(get_class(cfg.model._target_), CaptionModule)  # scst: its second-stage subclass
    assert issubclass(get_class(cfg.data._target_), CaptionDataModule)  # text_only: its caption-embedding subclass
    check(cfg)  # the value checks every command runs before any work
    opening = (CONF / "experiment" / f"{experiment}.yaml").read_text().splitlines()[:3]
    assert opening[0] == "# @package _global_" and f"# python -m captioner.train experiment={experiment}" in opening[1]


def test_coco_attn_has_the_papers_settings(tmp_path):
    cfg = compose_train(tmp_path / "run", tmp_path / "data", ["experiment=coco_attn"])
    assert (cfg.model.prefix_length, cfg.model.mapper.num_layers, cfg.trainer.max_epochs) == (40, 8, 12)
    assert (cfg.model.encoder, cfg.model.decoder, cfg.model.lr) == ("ViT-B/32", "gpt2", 5e-5)
    assert cfg.data.noise.rate == 0.1


def test_absent_pretrained_weights_fail_fast_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached CLIP or HF files
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = compose_train(tmp_path / "run", tmp_path / "data", ["experiment=coco_attn"])
    start = time.monotonic()
    with pytest.raises(Exception) as raised:
        run(cfg)
    assert time.monotonic() - start < 10
    error = raised.value.__cause__ or raised.value
    assert isinstance(error, MissingWeightsError), repr(raised.value)
    assert "ViT-B/32" in str(error) and "local path" in str(error) and "model.encoder" in str(error)


def test_fast_dev_run_of_the_embedded_default(tmp_path, data_dir):
    cfg = compose_train(tmp_path / "run", data_dir, ["debug=fdr"])
    metrics = run(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert (tmp_path / "run" / "config.yaml").exists()


def test_smoke_run_writes_captions_and_scores(smoke_cfg, tmp_path):
    run(smoke_cfg())
    out = tmp_path / "run"
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores) == {"model", "human", "percent_of_human", "fair", "scene", "clipscore"}
    assert set(scores["model"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}  # smoke: no METEOR
    assert set(scores["fair"]) == {"model", "human", "percent_of_human"}  # model and humans against the same K-1
    assert scores["scene"]["images"] == 16 and 0 <= scores["scene"]["accuracy"] <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/scene_accuracy"] == scores["scene"]["accuracy"] and "val/scene_accuracy" in metrics
    captions = json.loads((out / "captions_test.json").read_text())
    assert len(captions) == 16 and all(set(c) == {"image_id", "caption"} for c in captions)
    assert list((out / "checkpoints").glob("last.ckpt"))
    assert (out / "loss_curve.png").stat().st_size > 0
    assert (out / "samples_test.png").stat().st_size > 0


def test_cold_and_warm_caches_train_the_same_model(tmp_path):
    # pretraining and extraction (cold caches only) must not consume the run's random stream
    finals = []
    for name in ("cold", "warm"):
        cfg = compose_train(tmp_path / name, tmp_path / "data", ["experiment=smoke", "score=false"])
        run(cfg)
        finals.append(read_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")["state_dict"])
    for key, weight in finals[0].items():
        assert torch.equal(finals[1][key], weight), key


# mode=max on a falling validation loss: the first validation (step 10) stays the best of the four (to step 40)
BEST_AT_STEP_10_OF_40 = [
    "experiment=smoke", "trainer.max_epochs=2", "+trainer.val_check_interval=10", "model.val_cider_images=4",
    "callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=max",
    "callbacks.model_checkpoint.filename='best-step{step}'",
]


def test_last_ckpt_is_the_latest_validated_step_when_the_best_is_earlier(tmp_path, data_dir):
    # Lightning alone would leave last.ckpt at step 10 and a resume would repeat the 30 steps after it
    run(compose_train(tmp_path, data_dir, [*BEST_AT_STEP_10_OF_40, "score=false"]))
    checkpoints = {p.name: read_checkpoint(p)["global_step"] for p in (tmp_path / "checkpoints").glob("*.ckpt")}
    assert checkpoints == {"best-step10.ckpt": 10, "last.ckpt": 40}


@pytest.mark.parametrize("weights, checkpoint", [("best", "best-step10.ckpt"), ("last", "last.ckpt")])
def test_score_weights_names_the_weights_that_caption_the_test_split(tmp_path, data_dir, monkeypatch, weights, checkpoint):
    import captioner.train as train

    scored = {}
    real = train.Captioner

    def remember(module, device):  # the weights the test split is captioned with
        scored.update({k: v.clone() for k, v in module.state_dict().items()})
        return real(module, device)

    monkeypatch.setattr(train, "Captioner", remember)
    run(compose_train(tmp_path, data_dir, [*BEST_AT_STEP_10_OF_40, f"score_weights={weights}"]))
    expected = read_checkpoint(tmp_path / "checkpoints" / checkpoint)["state_dict"]
    assert expected and all(torch.equal(scored[k], v) for k, v in expected.items())


def test_a_run_the_time_cap_stops_ends_with_its_learning_rate_at_zero(tmp_path, data_dir):
    # 100,000 steps that 4 seconds cannot hold: the schedule follows the time and the final weights are annealed
    run(compose_train(tmp_path, data_dir, ["experiment=smoke", "score=false", "trainer.max_epochs=null",
                                           "trainer.max_steps=100000", "trainer.max_time=00:00:00:04", "model.warmup_steps=5"]))
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    (lr,) = checkpoint["lr_schedulers"][0]["_last_lr"]
    assert 5 < checkpoint["global_step"] < 50_000, checkpoint["global_step"]
    assert lr < 0.1 * checkpoint["hyper_parameters"]["lr"], lr  # by steps alone it would stand above 0.5
