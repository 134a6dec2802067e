"""`python -m captioner.evaluate`: equal to pycocoevalcap's COCOEvalCap, with and without a model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from captioner import metrics
from captioner.checkpoint import read_checkpoint
from captioner.evaluate import datamodule_for, run
from captioner.results import load_results, score_results_file
from conftest import CONF, ROOT

COCO_METRICS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


def compose_eval(output_dir: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def coco_mini_test(coco_mini: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The Karpathy test split of coco_mini as an official COCO references file, and a results file
    whose captions range from exact references to another image's caption."""
    karpathy = json.loads((coco_mini / "annotations" / "dataset_coco_mini_karpathy_format.json").read_text())
    test_ids = {im["cocoid"] for im in karpathy["images"] if im["split"] == "test"}
    official = json.loads((coco_mini / "annotations" / "captions_val2017_subset159.json").read_text())
    official["images"] = [im for im in official["images"] if im["id"] in test_ids]
    official["annotations"] = [a for a in official["annotations"] if a["image_id"] in test_ids]
    references = tmp_path / "references_test.json"
    references.write_text(json.dumps(official))
    first: dict[int, str] = {}
    for a in official["annotations"]:
        first.setdefault(a["image_id"], a["caption"])
    ids = [im["id"] for im in official["images"]]
    results = []
    for n, i in enumerate(ids):
        caption = first[i]
        if n % 3 == 1:
            caption = " ".join(caption.split()[: max(3, len(caption.split()) // 2)])  # a shorter partial caption
        elif n % 3 == 2:
            caption = first[ids[(n + 1) % len(ids)]]  # another image's caption
        results.append({"image_id": i, "caption": caption})
    results_file = tmp_path / "results_test.json"
    results_file.write_text(json.dumps(results))
    return references, results_file


def cocoevalcap(references: Path, results: Path, monkeypatch):
    """The official evaluation, exactly as the coco-caption example runs it. COCOEvalCap always adds
    SPICE, whose constructor downloads CoreNLP when it is absent: then it is replaced by a stub."""
    import pycocoevalcap.eval as official
    from pycocotools.coco import COCO

    if metrics.spice_missing():

        class NoSpice:
            def compute_score(self, gts, res):
                return float("nan"), [float("nan")] * len(gts)

            def method(self):
                return "SPICE"

        monkeypatch.setattr(official, "Spice", NoSpice)
    coco = COCO(str(references))
    coco_results = coco.loadRes(str(results))
    evaluation = official.COCOEvalCap(coco, coco_results)
    evaluation.params["image_id"] = coco_results.getImgIds()
    evaluation.evaluate()
    return evaluation


@pytest.mark.java
def test_results_file_equals_cocoevalcap_on_coco_mini(coco_mini, tmp_path, monkeypatch):
    references, results = coco_mini_test(coco_mini, tmp_path)
    out = tmp_path / "eval"
    cfg = compose_eval(out, [f"results={results}", f"references={references}"])
    assert cfg.ckpt_path is None  # results mode: no model anywhere
    scores = run(cfg)
    official = cocoevalcap(references, results, monkeypatch)

    written = json.loads((out / "scores.json").read_text())
    assert written == json.loads(json.dumps(scores))
    expected_metrics = COCO_METRICS + ([] if metrics.spice_missing() else ["SPICE"])
    assert list(written["model"]) == expected_metrics
    for metric in expected_metrics:
        assert written["model"][metric] == pytest.approx(official.eval[metric], abs=1e-6), metric
    if metrics.spice_missing():
        assert "SPICE" in written["unavailable"]
    per_image = {row["image_id"]: row for row in json.loads((out / "scores_per_image.json").read_text())}
    assert set(per_image) == set(official.imgToEval) and len(per_image) == 80
    for image_id, row in official.imgToEval.items():
        for metric in ["Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"]:  # COCOEvalCap mislabels METEOR's per-image order
            assert per_image[image_id][metric] == pytest.approx(row[metric], abs=1e-6)
    # the fair pair: both sides against K-1, humans the same as the standard leave-one-out
    assert written["fair"]["human"] == written["human"]
    assert written["fair"]["model"]["CIDEr"] < written["model"]["CIDEr"]  # a third of the captions are references


def test_results_file_errors_name_the_problem(tmp_path):
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "id": 1, "caption": "a cat"}]}))
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]))
    with pytest.raises(ValueError, match="more than one caption for image 1"):
        load_results(twice)
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps([{"image_id": 7, "caption": "a dog"}]))
    with pytest.raises(ValueError, match="not in .*right references file"):
        score_results_file(stranger, refs)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"1": "a cat"}))
    with pytest.raises(ValueError, match="not a COCO results file"):
        load_results(wrong)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run(compose_eval(tmp_path / "eval", []))


def test_spice_without_its_jars_is_reported_unavailable_never_downloaded(monkeypatch):
    import pycocoevalcap.spice.spice as spice

    def download(*args, **kwargs):
        raise AssertionError("SPICE tried to download CoreNLP")

    monkeypatch.setattr(spice, "get_stanford_models", download)
    monkeypatch.setattr(metrics, "spice_missing", lambda: "jars absent")
    with pytest.raises(RuntimeError, match="SPICE is unavailable: jars absent"):
        metrics.report({1: ["a cat", "a cat sits"]}, {1: "a cat"}, meteor=False, spice=True)


@pytest.mark.java
def test_checkpoint_mode_captions_and_scores_a_split(smoke_cfg, tmp_path):
    from captioner.train import run as train

    cfg = smoke_cfg("score=false")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    scores = run(compose_eval(out, [f"ckpt_path={ckpt}", "meteor=false", "decoding.strategy=greedy", "decoding.max_new_tokens=12"]))
    captions = json.loads((out / "captions_test.json").read_text())
    assert len(captions) == 16 and all(isinstance(c["caption"], str) for c in captions)
    assert set(scores) >= {"model", "human", "percent_of_human", "fair"}
    assert "METEOR" not in scores["model"] and math.isfinite(scores["model"]["CIDEr"])
    per_image = json.loads((out / "scores_per_image.json").read_text())
    assert {r["image_id"] for r in per_image} == {c["image_id"] for c in captions}
    # the training split too (how much of what it learnt it reproduces), each image captioned once
    run(compose_eval(tmp_path / "eval_train", [f"ckpt_path={ckpt}", "split=train", "meteor=false", "decoding.strategy=greedy", "decoding.max_new_tokens=12"]))
    train_split = read_checkpoint(ckpt)["datamodule_hyper_parameters"]["splits"]["train"]
    train_ids = [image["id"] for image in json.loads(Path(train_split["annotations"]).read_text())["images"]]
    assert sorted(c["image_id"] for c in json.loads((tmp_path / "eval_train" / "captions_train.json").read_text())) == sorted(train_ids)
    assert len(datamodule_for(ckpt, "train").eval_dataloader("train").dataset) == len(train_ids)
    with pytest.raises(ValueError, match="int8 and precision=bf16"):  # the options reach Captioner.from_pretrained
        run(compose_eval(tmp_path / "eval_both", [f"ckpt_path={ckpt}", "int8=true", "precision=bf16"]))
    assert not (tmp_path / "eval_both" / "scores.json").exists()
