"""python -m captioner.pretrain_lm [overrides]: language-model pretraining of a decoder on caption text.

The embedded default's tiny GPT-2 (and its tokenizer) by default (`python -m captioner.train` builds it first when absent),
the Llama-style one with `pretrain/lm=llama`; the captions of any training split and any size through `conf/pretrain_lm.yaml`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from captioner.config import hydra_main
from captioner.pretraining import run_steps


@hydra_main("pretrain_lm")
def main(cfg: DictConfig) -> None:
    run_steps(cfg, ["tokenizer", "lm"])


if __name__ == "__main__":
    main()
