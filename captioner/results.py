"""A split's captions and scores: caption it, score it, write and print them, read results files.

Training (its test split) and `python -m captioner.evaluate` both go through `score_split`, so a
run directory and an evaluation directory hold the same files:
    captions_<split>.json    COCO results format [{image_id, caption}]
    scores.json              `metrics.Report.to_dict()`
    scores_per_image.json    one row per image: {image_id, caption, metric: score, ...}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from captioner.api import Captioner
from captioner.generate import Decoding
from captioner.metrics import Report, report, table
from captioner.scene import scene_accuracy, scenes_of
from captioner.scene import table as scene_table


@torch.no_grad()
def caption_split(captioner: Captioner, datamodule, split: str, decoding: Decoding) -> dict[int, str]:
    """{image_id: caption} for every image of `split` (features from the datamodule's store)."""
    loader = datamodule.eval_dataloader(split)
    captions: dict[int, str] = {}
    for batch in tqdm(loader, desc=f"caption {split}", unit="batch"):
        captions.update(zip(batch["image_id"].tolist(), captioner.caption_features(batch, decoding)))
    return captions


def score_split(
    captioner: Captioner, datamodule, split: str, decoding: Decoding, meteor: bool = True, spice: bool | str = False, fair: bool = False
) -> tuple[dict[int, str], Report]:
    """Caption `split` and score it against the datamodule's references (`metrics.report`)."""
    captions = caption_split(captioner, datamodule, split, decoding)
    scores = report(datamodule.references(split), captions, meteor=meteor, spice=spice, fair=fair)
    scenes = scenes_of(datamodule.splits[split])
    if scenes:  # synthetic data: are the captions right, not only phrased like the references?
        scores.sections["scene"] = scene_accuracy(scenes, captions)
    return captions, scores


def write_results(run_dir: str | Path, split: str | None, captions: Mapping[int, str], scores: Report) -> None:
    """`split=None`: the captions came from a results file, which exists already."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if split is not None:
        results = [{"image_id": i, "caption": c} for i, c in sorted(captions.items())]  # COCO results format
        (run_dir / f"captions_{split}.json").write_text(json.dumps(results, indent=1))
    (run_dir / "scores.json").write_text(json.dumps(scores.to_dict(), indent=2))
    rows = [{"image_id": i, "caption": captions[i], **values} for i, values in scores.per_image.items()]  # COCOEvalCap.evalImgs' layout
    (run_dir / "scores_per_image.json").write_text(json.dumps(rows, indent=1))


def print_scores(scores: Report, title: str) -> None:
    from rich.console import Console

    console = Console()
    if scores.human is None:
        console.print(table({"model (vs all K refs)": scores.model}, title=title))
    else:
        standard = {"model (vs all K refs)": scores.model, "human (leave-one-out, K-1)": scores.human, "% of human": scores.percent_of_human}
        console.print(table(standard, title=f"{title}\nstandard: model against all K references, humans against the other K-1"))
    if scores.fair is not None:
        fair = scores.fair
        columns = {"model (vs K-1)": fair["model"], "human (vs K-1)": fair["human"], "% of human": fair["percent_of_human"]}
        console.print(table(columns, title="fair: model and human both against the same K-1 references, averaged over k"))
    if "scene" in scores.sections:
        console.print(scene_table(scores.sections["scene"]))
    for metric, reason in scores.unavailable.items():
        console.print(f"{metric}: unavailable ({reason})")


def _read_json(path: Path, wanted: str):
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # an image or a CSV given by mistake
        raise ValueError(f"{path} is not JSON ({e}): give {wanted}") from None


def load_results(path: str | Path) -> dict[int, str]:
    """A COCO results file `[{"image_id": int, "caption": str}, ...]`: one caption per image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist (results=...)")
    rows = _read_json(path, "a COCO results file (results=...)")
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
    coco = _read_json(path, "a COCO captions file (references=...)")
    if not isinstance(coco, Mapping) or "images" not in coco or "annotations" not in coco:
        raise ValueError(f"{path} is not in the COCO caption format: it needs 'images' and 'annotations'")
    references: dict[int, list[str]] = {int(im["id"]): [] for im in coco["images"]}
    for a in coco["annotations"]:
        references.setdefault(int(a["image_id"]), []).append(a["caption"])
    return references


def score_results_file(results: str | Path, references: str | Path, meteor: bool = True, spice: bool | str = "auto", fair: bool = True):
    """(captions, Report) for a results file; the images scored are the captioned ones, in the
    references file's order, as COCOEvalCap does with `params['image_id'] = cocoRes.getImgIds()`."""
    captions, refs = load_results(results), load_references(references)
    unknown = sorted(set(captions) - set(refs))
    if unknown:
        raise ValueError(f"{len(unknown)} captioned images are not in {references}, e.g. {unknown[:5]}: is it the right references file?")
    uncaptioned = len(refs) - len(captions)
    if uncaptioned:
        print(f"note: {uncaptioned} of {len(refs)} images in {references} have no caption in {results}; scoring the {len(captions)} captioned ones")
    refs = {i: caps for i, caps in refs.items() if i in captions}
    return captions, report(refs, captions, meteor=meteor, spice=spice, fair=fair)
