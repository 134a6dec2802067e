"""Every experiment config runs, and the budgets sit where they belong.

The COCO experiments run on coco_mini (Karpathy format) with the real architectures at toy size and
GPT-2's real tokenizer; `tests/test_real_path.py` runs them at full size (slow)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from captioner.extract import run as extract
from captioner.train import run
from conftest import CONF, SHARED_DATA, compose_app, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
COCO_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith("coco_")]
TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))
CPU_BUDGET = "00:00:08:00"  # conf/budget/synthetic_tiny.yaml: the embedded default's caption-training cap

TOY_CLIP = {  # clip.model.CLIP arguments; the text tower keeps CLIP's BPE vocabulary (coco_text_only embeds captions)
    "embed_dim": 32, "image_resolution": 32, "vision_layers": 1, "vision_width": 64, "vision_patch_size": 8,
    "context_length": 16, "vocab_size": 49408, "transformer_width": 32, "transformer_heads": 2, "transformer_layers": 1,
}
TOY_GPT2 = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}


def flow(mapping: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"


def coco_mini_overrides(coco_mini: Path, cache_dir: Path, encoder, decoder, tokenizer: Path) -> list[str]:
    """A COCO experiment on coco_mini in Karpathy's format (80 train / 79 val / 80 test images), with
    the given encoder and decoder (a local file or directory, or a mapping of sizes)."""
    def spec(value) -> str:
        return flow(value) if isinstance(value, dict) else str(value)

    return [
        "data=karpathy",
        f"data.splits.train.file={coco_mini / 'annotations' / 'dataset_coco_mini_karpathy_format.json'}",
        f"data.splits.train.images={coco_mini / 'images'}",
        f"data.cache_dir={cache_dir}",
        "data.num_workers=0",
        "data.extract_batch_size=16",
        f"model.encoder={spec(encoder)}",
        f"model.decoder={spec(decoder)}",
        f"model.tokenizer={tokenizer}",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "logger=csv",
    ]


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_no_gpu_trainer_or_coco_experiment_carries_the_cpu_budget(experiment, trainer, tmp_path):
    overrides = [f"trainer={trainer}"] + ([f"experiment={experiment}"] if experiment else [])
    cfg = compose_train(tmp_path / "run", tmp_path / "data", overrides)
    own = yaml.safe_load((CONF / "trainer" / f"{trainer}.yaml").read_text())
    assert "max_time" not in own and "max_epochs" not in own  # a trainer says how to run, not for how long
    if experiment in COCO_EXPERIMENTS:
        stated = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text()).get("trainer") or {}
        assert cfg.trainer.max_time is None and stated.get("max_time", None) is None
        if "scst" not in experiment:  # SCST's second stage is an epoch; the others state the paper's schedule
            assert cfg.trainer.max_epochs == stated["max_epochs"] >= 10
    else:  # the embedded default and its variants keep the embedded default's CPU budget
        assert cfg.trainer.max_time == CPU_BUDGET and cfg.data.synthetic is not None


def test_model_tiny_composes_with_coco_data(tmp_path):
    cfg = compose_train(tmp_path / "run", tmp_path / "data", ["model=tiny", "data=coco"])
    resolved = OmegaConf.to_container(cfg.model, resolve=True)  # every interpolation resolves without data.synthetic
    assert cfg.data.synthetic is None and resolved["tokenizer"] == cfg.data.tokenizer
    assert resolved["tokenizer"].startswith(cfg.data.cache_dir)  # built from COCO's training split, beside its features


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_at_tiny_size(experiment, tmp_path, data_dir):
    if "scst" in experiment:
        pytest.skip("SCST starts from a cross-entropy checkpoint: tests/test_scst.py runs experiment=scst from one")
    overrides = [f"experiment={experiment}", "debug=fdr"]
    if experiment in COCO_EXPERIMENTS:
        coco_mini = SHARED_DATA / "coco_mini"
        if not coco_mini.is_dir():
            pytest.skip("../shared/data/coco_mini is not present")
        overrides += coco_mini_overrides(coco_mini, tmp_path / "features", TOY_CLIP, TOY_GPT2, SHARED_DATA / "gpt2_tokenizer")
        overrides += ["trainer=cpu", "model.prefix_length=4", "model.mapper.num_layers=1", "model.mapper.num_heads=2"]
    else:
        overrides += ["data.synthetic.root=${paths.data_dir}/synthetic_smoke", "data.synthetic.sizes={train: 64, val: 16, test: 16}",
                      # experiment=smoke's few pretraining steps: the path runs, in seconds
                      "pretrain.clip.steps=4", "pretrain.clip.batch_size=32", "pretrain.clip.warmup_steps=1", "pretrain.clip.val_every=2",
                      "pretrain.lm.steps=4", "pretrain.lm.batch_size=16", "pretrain.lm.warmup_steps=1", "pretrain.lm.val_every=2"]
    stores = extract(compose_app("extract", tmp_path / "extract", data_dir, [o for o in overrides if not o.startswith("debug=")]))
    assert {"train", "val", "test"} <= set(stores)
    written = {s: (p / "manifest.json").stat().st_mtime_ns for s, p in stores.items()}
    cfg = compose_train(tmp_path / "run", data_dir, overrides + ["score_meteor=false"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = run(cfg)
    assert not [str(w.message) for w in caught if "in eval mode" in str(w.message)]  # the frozen parts are, on purpose
    assert metrics["train/loss"] == metrics["train/loss"] and metrics["train/loss"] > 0  # finite, a real step ran
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["task_name"] == "debug" and resolved["trainer"]["fast_dev_run"] is True
    assert {s: (p / "manifest.json").stat().st_mtime_ns for s, p in stores.items()} == written  # training found them complete
