"""python -m captioner.serve ckpt=path/to/last.ckpt [host=127.0.0.1 port=8000 int8=false ...] (conf/serve.yaml)

The model is loaded once; concurrent requests are micro-batched into one forward pass. Memory and
concurrency are bounded by `limits` (captioner/web/limits.py); `api_key` (or CAPTIONER_API_KEY) makes
every caption request carry the key, and a host beyond loopback needs it or `allow_public=true`.
"""

from __future__ import annotations

import ipaddress

import torch
import uvicorn
from omegaconf import DictConfig

from captioner.api import Captioner
from captioner.config import hydra_main
from captioner.web.app import Limits, create_app
from captioner.web.identity import describe_model


def check_exposure(host: str, api_key: str | None, allow_public: bool) -> None:
    """Refuse to listen beyond loopback without a key, unless told to."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        loopback = False
    if not loopback and not api_key and not allow_public:
        raise ValueError(f"host={host} exposes the server beyond this machine without an API key: set api_key=... "
                         "(or CAPTIONER_API_KEY), or pass allow_public=true to serve anyone who can reach it")


def build_app(cfg: DictConfig):
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    captioner = Captioner.from_pretrained(cfg.ckpt, device=cfg.device, int8=cfg.int8, precision=cfg.precision, datastore=cfg.get("datastore"),
                                         engine=cfg.get("engine", "torch"), encoder=cfg.get("encoder"))
    return create_app(captioner, Limits(**cfg.limits), max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms,
                      api_key=cfg.api_key or None, model=describe_model(cfg.ckpt))


@hydra_main("serve")
def main(cfg: DictConfig) -> None:
    check_exposure(cfg.host, cfg.api_key, cfg.allow_public)  # before the model loads: the refusal comes at once
    app = build_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, limit_concurrency=cfg.limits.max_connections,
                timeout_keep_alive=5)


if __name__ == "__main__":
    main()
