"""python -m captioner.serve ckpt=path/to/last.ckpt [host=127.0.0.1 port=8000 int8=false ...] (conf/serve.yaml)

The model is loaded once; concurrent requests are micro-batched into one forward pass.
"""

from __future__ import annotations

import torch
import uvicorn
from omegaconf import DictConfig

from captioner.api import Captioner
from captioner.config import hydra_main
from captioner.web.app import Limits, create_app


def build_app(cfg: DictConfig):
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    captioner = Captioner.from_pretrained(cfg.ckpt, device=cfg.device, int8=cfg.int8, precision=cfg.precision, datastore=cfg.get("datastore"),
                                         engine=cfg.get("engine", "torch"))
    return create_app(captioner, Limits(**cfg.limits), max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms)


@hydra_main("serve")
def main(cfg: DictConfig) -> None:
    app = build_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)


if __name__ == "__main__":
    main()
