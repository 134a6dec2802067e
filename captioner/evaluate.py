"""python -m captioner.evaluate: official scores with the standard and the fair human baselines.

    python -m captioner.evaluate ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt [split=test]
    python -m captioner.evaluate results=captions_test.json references=captions_val2017.json

The first captions a split with a trained model (its data settings come from the checkpoint,
`data.*` overrides them); the second scores a COCO results file (`[{image_id, caption}]`) against
a COCO references file with no model at all. Both write `scores.json`, `scores_per_image.json`
and print the tables, through captioner/results.py, as training does for its test split.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from captioner import clipscore
from captioner.models.tower import NoTextTowerError
from captioner.api import Captioner
from captioner.checkpoint import read_checkpoint
from captioner.config import hydra_main
from captioner.data.datamodule import CaptionDataModule
from captioner.generate import decoding_from
from captioner.results import print_scores, score_results_file, score_split, write_results


def datamodule_for(ckpt_path: str | Path, split: str, overrides: Mapping | None = None):
    """The checkpoint's data settings (Lightning stores the DataModule's hyperparameters) with
    `overrides` on top, reduced to the one split evaluated, set up."""
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
        captions, scores = score_results_file(cfg.results, cfg.references, cfg.meteor, cfg.spice)
        scores.unavailable["CLIPScore"] = "a results file has no images: score a checkpoint (ckpt_path=...) for CLIPScore"
        title = f"{cfg.results}: {len(captions)} images"
        split = None
    elif cfg.ckpt_path:
        captioner = Captioner.from_pretrained(cfg.ckpt_path, device=cfg.device, int8=cfg.int8, precision=cfg.precision,
                                             encoder=cfg.encoder)
        datamodule = datamodule_for(cfg.ckpt_path, cfg.split, cfg.data)
        split = cfg.split
        captions, scores = score_split(captioner, datamodule, split, decoding_from(cfg.decoding), cfg.meteor, cfg.spice, fair=True)
        try:
            clip = clipscore.score_split(captioner.module.encoder, datamodule, split, captions, cfg.clipscore.model)
        except NoTextTowerError as refused:  # an image-only tower: every other score stands
            scores.unavailable["CLIPScore"] = str(refused)
        else:
            clipscore.add_to(scores.sections, clip)
            for image_id, values in clip["per_image"].items():
                scores.per_image[image_id].update(values)
        title = f"{split} split of {cfg.ckpt_path}: {len(captions)} images"
    else:
        raise ValueError("nothing to evaluate: pass ckpt_path=... (caption a split) or results=... references=... (score a file)")
    write_results(output_dir, split, captions, scores)
    print_scores(scores, title)
    if "clipscore" in scores.sections:
        clipscore.print_table(scores.sections)
    print(f"wrote {output_dir / 'scores.json'} and {output_dir / 'scores_per_image.json'}")
    return scores.to_dict()


@hydra_main("eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
