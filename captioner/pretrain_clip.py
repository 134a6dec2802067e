"""python -m captioner.pretrain_clip [overrides]: contrastive pretraining of a CLIP on image-caption pairs.

The embedded default's tiny CLIP by default (`python -m captioner.train` builds it first when absent);
any COCO-format or custom training split and any CLIP size through `conf/pretrain_clip.yaml`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from captioner.config import hydra_main
from captioner.pretraining import run_steps


@hydra_main("pretrain_clip")
def main(cfg: DictConfig) -> None:
    run_steps(cfg, ["clip"])


if __name__ == "__main__":
    main()
