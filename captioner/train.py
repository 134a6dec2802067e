"""python -m captioner.train [experiment=...] [overrides]: fit, then caption and score the test split."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from captioner import clipscore
from captioner.api import Captioner
from captioner.callbacks import PreemptionCheckpoint, RunSettings, check_resume
from captioner.checkpoint import read_checkpoint, resolve_ckpt_path
from captioner.config import hydra_main
from captioner.generate import decoding_from
from captioner.grid import caption_grid
from captioner.loggers import build_loggers
from captioner.pretraining import prepare as prepare_pretrained
from captioner.results import print_scores, score_split, write_results

# what a resumed run must share with the run that wrote its checkpoint: the data order and the optimizer
RESUME_KEYS = ("seed", "data.batch_size", "data.length_buckets", "data.seed", "data.noise", "data.mirror", "data.mirror_swap",
               "model.lr", "model.decoder_lr", "model.weight_decay", "model.warmup_steps", "model.adamw", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val",
               "trainer.devices", "trainer.num_nodes", "trainer.max_epochs", "trainer.max_steps")


def resume_settings(cfg: DictConfig) -> dict:
    return {key: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for key in RESUME_KEYS for v in [OmegaConf.select(cfg, key, default=None)]}


def run(cfg: DictConfig) -> dict:
    """Train and score; returns the metrics a sweeper optimises (`val/cider`, test scores)."""
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    if cfg.get("threads"):  # jobs side by side (hydra/launcher=local) share the cores instead of fighting for them
        torch.set_num_threads(int(cfg.threads))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    settings = resume_settings(cfg)
    if ckpt_path and Path(ckpt_path).is_file():  # before config.yaml is rewritten: a refused resume changes nothing
        check_resume(read_checkpoint(ckpt_path, mmap=True), settings, bool(cfg.get("allow_resume_changes", False)))
    if rank_zero_only.rank == 0:  # DDP: every process runs this; one set of outputs
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # writes the embedded dataset on first use
    prepare_pretrained(cfg.get("pretrain"))  # the tiny models' tokenizer, CLIP and GPT-2, cached by manifest
    module = instantiate(cfg.model)  # before any feature extraction: absent weights fail at once
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    callbacks += [RunSettings(settings), PreemptionCheckpoint(str(output_dir / "checkpoints"))]
    loggers = build_loggers(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        print(f"preempted: SIGTERM at step {trainer.global_step}; {output_dir / 'checkpoints' / 'last.ckpt'} holds this step, "
              f"resume with ckpt_path=auto", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)  # what a shell reports for a process SIGTERM ended: the job did not finish

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.score and trainer.is_global_zero and not trainer.fast_dev_run:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if cfg.score_weights == "best" and best:  # "last": the final step's weights, as fit left them
            module.load_state_dict(read_checkpoint(best)["state_dict"])
        datamodule.setup("test")
        captioner = Captioner(module, module.device)
        captions, scores = score_split(captioner, datamodule, "test", decoding_from(cfg.test_decoding), meteor=cfg.score_meteor, fair=True)
        clip = clipscore.score_split(module.encoder, datamodule, "test", captions, cfg.clipscore.model)
        clipscore.add_to(scores.sections, clip)
        write_results(output_dir, "test", captions, scores)
        print_scores(scores, f"test split: {len(captions)} images ({output_dir})")
        clipscore.print_table(scores.sections)
        shown = [r for r in datamodule.records["test"] if r.path.is_file()][:12]  # tar shards: no image file to show
        if shown:
            caption_grid([r.path for r in shown], [captions[r.image_id] for r in shown], output_dir / "samples_test.png",
                         references=[r.captions[0] for r in shown])
        metrics.update({f"test/{k}": v for k, v in scores.model.items()})
        metrics.update({f"test/fair_percent_of_human_{k}": v for k, v in scores.fair["percent_of_human"].items()})
        if "scene" in scores.sections:
            metrics["test/scene_accuracy"] = scores.sections["scene"]["accuracy"]
        metrics.update({f"test/{k}": v for k, v in scores.sections["clipscore"]["model"].items()})
    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()  # flushed now; the next job of a multirun starts its own W&B run
    metrics["time/wall_s"] = time.perf_counter() - start  # pretraining, extraction, training and scoring
    if trainer.is_global_zero:  # what captioner.sweep_summary tabulates for each job of a sweep
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


@hydra_main("train")
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    if HydraConfig.get().mode.name == "MULTIRUN":
        return metrics.get("val/cider")  # what the Optuna sweeper maximises
    return None


if __name__ == "__main__":
    main()
