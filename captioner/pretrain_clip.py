"""python -m captioner.pretrain_clip [overrides]: contrastive pretraining of a CLIP on image-caption pairs.

The embedded default's tiny CLIP by default (`python -m captioner.train` builds it first when absent);
any COCO-format or custom training split and any CLIP size through `conf/pretrain_clip.yaml`.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from captioner import resolvers  # noqa: F401 - the run_id resolver of conf/hydra
from captioner.pretraining import run_steps

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain_clip")
def main(cfg: DictConfig) -> None:
    run_steps(cfg, ["clip"])


if __name__ == "__main__":
    main()
