"""python -m captioner.evaluate: official scores with the standard and the fair human baselines.

    python -m captioner.evaluate ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt [split=test]
    python -m captioner.evaluate results=captions_test.json references=captions_val2017.json

The first captions a split with a trained model (its data settings come from the checkpoint,
`data.*` overrides them); the second scores a COCO results file (`[{image_id, caption}]`) against
a COCO references file with no model at all. Both write `scores.json`, `scores_per_image.json`
and print the tables. The functions below are also what training uses to score its test split.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from captioner.api import Captioner
from captioner.generate import Decoding, decoding_from
from captioner.metrics import METRICS, PerImage, report, spice_missing, table
from captioner.scene import scene_accuracy, scenes_of
from captioner.scene import table as scene_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub retries: absent weights fail at once (models/hub.py)
# conf/hydra/default.yaml names run directories with it (captioner/train.py registers the same)
OmegaConf.register_new_resolver("run_id", lambda: secrets.token_hex(3), use_cache=True, replace=True)


@torch.no_grad()
def caption_split(captioner: Captioner, datamodule, split: str, decoding: Decoding) -> dict[int, str]:
    """{image_id: caption} for every image of `split` (features from the datamodule's store)."""
    loader = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}[split]()
    captions: dict[int, str] = {}
    for batch in tqdm(loader, desc=f"caption {split}", unit="batch"):
        captions.update(zip(batch["image_id"].tolist(), captioner.caption_features(batch, decoding)))
    return captions


def write_results(run_dir: str | Path, split: str | None, captions: dict[int, str], scores: dict, per_image: PerImage | None = None) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = [{"image_id": i, "caption": c} for i, c in sorted(captions.items())]  # COCO results format
    if split is not None:  # None: the captions came from a results file, which exists already
        (run_dir / f"captions_{split}.json").write_text(json.dumps(results, indent=1))
    (run_dir / "scores.json").write_text(json.dumps(scores, indent=2))
    if per_image is not None:  # COCOEvalCap.evalImgs' layout: one row per image
        rows = [{"image_id": i, "caption": captions[i], **values} for i, values in per_image.items()]
        (run_dir / "scores_per_image.json").write_text(json.dumps(rows, indent=1))


def _ordered(scores: dict) -> dict:
    """Metric columns in pycocoevalcap's order (Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE)."""
    ordered = dict(scores)
    for part in ("model", "human", "percent_of_human"):
        ordered[part] = {m: scores[part][m] for m in METRICS if m in scores[part]}
    return ordered


def score_split(
    references: dict[int, list[str]], captions: dict[int, str], meteor: bool = True, spice: bool = False, fair: bool = False
) -> dict:
    """{"model", "human", "percent_of_human"} (+ "fair" when asked): see captioner/metrics.py."""
    return score_split_images(references, captions, meteor, spice, fair)[0]


def score_split_images(
    references: dict[int, list[str]], captions: dict[int, str], meteor: bool = True, spice: bool = False, fair: bool = False
) -> tuple[dict, PerImage]:
    scores, per_image = report(references, captions, meteor=meteor, spice=spice, fair=fair)
    if "fair" in scores:
        scores["fair"] = _ordered(scores["fair"])
    return _ordered(scores), per_image


def evaluate_captions(references: dict[int, list[str]], captions: dict[int, str], meteor: bool = True, spice: bool | str = "auto") -> tuple[dict, PerImage]:
    """Everything `python -m captioner.evaluate` reports: (scores with the fair pair, per-image scores).
    `spice`: True (fail when its jars are absent), False, or "auto" (run it when they are present)."""
    missing = spice_missing()
    if spice is True and missing:
        raise RuntimeError(f"spice=true but SPICE is unavailable: {missing} (or set spice=auto)")
    use_spice = spice in (True, "auto") and not missing
    scores, per_image = score_split_images(references, captions, meteor=meteor, spice=use_spice, fair=True)
    if not use_spice:
        scores["unavailable"] = {"SPICE": missing or "turned off (spice=false)"}
    return scores, per_image


def print_scores(scores: dict, title: str) -> None:
    from rich.console import Console

    console = Console()
    standard = {"model (vs all K refs)": scores["model"], "human (leave-one-out, K-1)": scores["human"], "% of human": scores["percent_of_human"]}
    console.print(table(standard, title=f"{title}\nstandard: model against all K references, humans against the other K-1"))
    if "fair" in scores:
        fair = scores["fair"]
        columns = {"model (vs K-1)": fair["model"], "human (vs K-1)": fair["human"], "% of human": fair["percent_of_human"]}
        console.print(table(columns, title="fair: model and human both against the same K-1 references, averaged over k"))
    if "scene" in scores:
        console.print(scene_table(scores["scene"]))
    for metric, reason in scores.get("unavailable", {}).items():
        console.print(f"{metric}: unavailable ({reason})")


def add_scene_accuracy(scores: dict, split: Mapping, captions: Mapping[int, str]) -> dict:
    """`scores["scene"]` when the split's annotations carry scenes (the synthetic data); else unchanged."""
    scenes = scenes_of(split)
    if scenes:
        scores["scene"] = scene_accuracy(scenes, captions)
    return scores


def load_results(path: str | Path) -> dict[int, str]:
    """A COCO results file `[{"image_id": int, "caption": str}, ...]`: one caption per image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist (results=...)")
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) and {"image_id", "caption"} <= set(r) for r in rows):
        raise ValueError(f"{path} is not a COCO results file: it must be a list of {{'image_id': ..., 'caption': ...}}")
    captions: dict[int, str] = {}
    for r in rows:
        image_id = int(r["image_id"])
        if image_id in captions:
            raise ValueError(f"{path} has more than one caption for image {image_id}: keep one per image")
        captions[image_id] = str(r["caption"])
    return captions


def load_references(path: str | Path) -> dict[int, list[str]]:
    """A COCO captions file: {image_id: [captions]} in the file's image order, as pycocotools reads it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"references file {path} does not exist (references=...)")
    coco = json.loads(path.read_text())
    if not isinstance(coco, Mapping) or "images" not in coco or "annotations" not in coco:
        raise ValueError(f"{path} is not in the COCO caption format: it needs 'images' and 'annotations'")
    references: dict[int, list[str]] = {int(im["id"]): [] for im in coco["images"]}
    for a in coco["annotations"]:
        references.setdefault(int(a["image_id"]), []).append(a["caption"])
    return references


def score_results_file(results: str | Path, references: str | Path, meteor: bool = True, spice: bool | str = "auto"):
    """(captions, scores, per-image scores) for a results file; the images scored are the captioned
    ones, in the references file's order, as COCOEvalCap does with `params['image_id'] = cocoRes.getImgIds()`."""
    captions, refs = load_results(results), load_references(references)
    unknown = sorted(set(captions) - set(refs))
    if unknown:
        raise ValueError(f"{len(unknown)} captioned images are not in {references}, e.g. {unknown[:5]}: is it the right references file?")
    uncaptioned = len(refs) - len(captions)
    if uncaptioned:
        print(f"note: {uncaptioned} of {len(refs)} images in {references} have no caption in {results}; scoring the {len(captions)} captioned ones")
    refs = {i: caps for i, caps in refs.items() if i in captions}
    return (captions, *evaluate_captions(refs, captions, meteor, spice))


def datamodule_for(ckpt_path: str | Path, split: str, overrides: Mapping | None = None):
    """The checkpoint's data settings (Lightning stores the DataModule's hyperparameters) with
    `overrides` on top, reduced to the one split evaluated, set up."""
    from captioner.checkpoint import read_checkpoint
    from captioner.data.datamodule import CaptionDataModule

    saved = {}
    if Path(ckpt_path).is_file():
        saved = dict(read_checkpoint(ckpt_path).get("datamodule_hyper_parameters") or {})
    settings = OmegaConf.to_container(OmegaConf.merge(saved, overrides or {}), resolve=True)
    splits = settings.get("splits") or {}
    if split not in splits:
        raise ValueError(
            f"no data for split {split!r}: set data.splits.{split}.annotations=... and "
            f"data.splits.{split}.images=... (a COCO captions file and its image folder)"
        )
    settings["splits"] = {split: splits[split]}
    settings.pop("text_batch_size", None)  # text-only training's setting: evaluation reads image features
    datamodule = CaptionDataModule(**settings)
    datamodule.prepare_data()
    datamodule.setup("test")
    return datamodule


def run(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    if cfg.results:
        if not cfg.references:
            raise ValueError("results=... needs references=... (a COCO captions file with the human captions)")
        captions, scores, per_image = score_results_file(cfg.results, cfg.references, cfg.meteor, cfg.spice)
        title = f"{cfg.results}: {len(captions)} images"
        split = None
    elif cfg.ckpt_path:
        captioner = Captioner.from_pretrained(cfg.ckpt_path, device=cfg.device, int8=cfg.int8, precision=cfg.precision)
        datamodule = datamodule_for(cfg.ckpt_path, cfg.split, cfg.data)
        split = cfg.split
        captions = caption_split(captioner, datamodule, split, decoding_from(cfg.decoding))
        scores, per_image = evaluate_captions(datamodule.references(split), captions, cfg.meteor, cfg.spice)
        add_scene_accuracy(scores, datamodule.splits[split], captions)
        title = f"{split} split of {cfg.ckpt_path}: {len(captions)} images"
    else:
        raise ValueError("nothing to evaluate: pass ckpt_path=... (caption a split) or results=... references=... (score a file)")
    write_results(output_dir, split, captions, scores, per_image)
    print_scores(scores, title)
    print(f"wrote {output_dir / 'scores.json'} and {output_dir / 'scores_per_image.json'}")
    return scores


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
