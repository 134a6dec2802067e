"""CLIP and GPT-2 with random weights, saved the way a user who downloaded the published ones has them.

    python bench/user_weights.py --out DIR --tokenizer ../shared/data/gpt2_tokenizer            # ViT-B/32 + GPT-2 124M
    python bench/user_weights.py --out DIR --tokenizer ../shared/data/gpt2_tokenizer --small    # the same formats, tiny

DIR receives `ViT-B-32.pt`, a TorchScript archive as OpenAI ships CLIP (`clip.load(..., jit=True)` format:
the traced model, read back by `clip.model.build_model(torch.jit.load(f).state_dict())`), and `gpt2/`,
a transformers `save_pretrained` directory with GPT-2's real vocab.json + merges.txt beside it. There is
no network here and no published weights: random weights at the published sizes cost the same FLOPs
and bytes, which is what the GPU check measures.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# small: the published formats at a size a CPU runs in seconds (a ViT of 2 layers, a GPT-2 of 2 layers)
SMALL_CLIP = dict(embed_dim=64, image_resolution=224, vision_layers=2, vision_width=128, vision_patch_size=32,
                  context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=2, transformer_layers=2)
SMALL_GPT2 = dict(n_layer=2, n_embd=128, n_head=2)


def write_clip(path: Path, small: bool) -> Path:
    """A random CLIP traced to TorchScript, as OpenAI's ViT-B-32.pt is."""
    from clip.model import CLIP

    from captioner.models.zoo import CLIP_ARCHS, resolve

    torch.manual_seed(0)
    model = CLIP(**(SMALL_CLIP if small else resolve({"arch": "ViT-B/32"}, CLIP_ARCHS, "model.encoder"))).eval()
    image = torch.randn(1, 3, model.visual.input_resolution, model.visual.input_resolution)
    text = torch.zeros(1, model.context_length, dtype=torch.long)
    text[0, :2] = torch.tensor([1, 2])  # argmax picks the end-of-text position
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warnings about Python values: the traced graph is never run here
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(path))
    return path


def write_gpt2(folder: Path, tokenizer: Path, small: bool) -> Path:
    """A random GPT-2 (124M: `GPT2Config()`) saved with `save_pretrained`, GPT-2's tokenizer files beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**(SMALL_GPT2 if small else {}))).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer / name, folder / name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=ROOT.parent / "shared" / "data" / "gpt2_tokenizer", help="GPT-2's vocab.json + merges.txt")
    parser.add_argument("--small", action="store_true", help="tiny models in the same formats (the CPU check)")
    args = parser.parse_args()
    if not (args.tokenizer / "vocab.json").is_file() or not (args.tokenizer / "merges.txt").is_file():
        sys.exit(f"error: GPT-2's vocab.json + merges.txt are not in {args.tokenizer}: pass --tokenizer DIR")
    clip_pt = write_clip(args.out / "ViT-B-32.pt", args.small)
    gpt2 = write_gpt2(args.out / "gpt2", args.tokenizer, args.small)
    print(f"wrote {clip_pt} and {gpt2}/")


if __name__ == "__main__":
    main()
