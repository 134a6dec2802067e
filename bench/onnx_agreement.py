"""ONNX Runtime vs PyTorch fp32 captions of a trained model on its test split's images (greedy and beam 3).

    python bench/onnx_agreement.py --ckpt outputs/train/runs/<run>/checkpoints/last.ckpt

The checkpoint is exported with its ONNX graphs into a temporary folder (captioner.export onnx=true);
both engines caption every image of the split named in the run's data settings, from the image files,
with the same `Decoding`; printed: the share of identical captions and a few that differ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.api import Captioner  # noqa: E402
from captioner.checkpoint import read_checkpoint  # noqa: E402
from captioner.export import export  # noqa: E402


def split_images(ckpt: Path, split: str) -> list[Path]:
    """The split's image files, from the checkpoint's data settings (the run's config.yaml)."""
    import yaml

    config = ckpt.parent.parent / "config.yaml"
    if not config.is_file():
        sys.exit(f"error: {config} is missing: pass a checkpoint inside its training run directory")
    folder = Path(yaml.safe_load(config.read_text())["data"]["splits"][split]["images"])
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=0, help="caption only the first N images (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    args = parser.parse_args()
    read_checkpoint(args.ckpt)  # refuses a code-running pickle first
    images = split_images(args.ckpt, args.split)[: args.limit or None]
    out = export(args.ckpt, Path(tempfile.mkdtemp(prefix="captioner-onnx-agreement-")), onnx=True)
    exact, onnx = Captioner.from_pretrained(out, prepacked=False), Captioner.from_pretrained(out, engine="onnx")
    for decoding in ({"strategy": "greedy"}, {"strategy": "beam", "num_beams": 3}):
        start = time.perf_counter()
        a = exact.caption(images, max_new_tokens=args.max_new_tokens, **decoding)
        middle = time.perf_counter()
        b = onnx.caption(images, max_new_tokens=args.max_new_tokens, **decoding)
        end = time.perf_counter()
        same = sum(x == y for x, y in zip(a, b))
        name = decoding["strategy"] + (" 3" if decoding["strategy"] == "beam" else "")
        print(f"{name}: {same}/{len(images)} identical ({100 * same / len(images):.1f} %); "
              f"PyTorch fp32 {middle - start:.1f} s, ONNX Runtime {end - middle:.1f} s")
        for i in [i for i in range(len(a)) if a[i] != b[i]][:3]:
            print(f"  differs on {images[i].name}: PyTorch {a[i]!r} | ONNX Runtime {b[i]!r}")


if __name__ == "__main__":
    main()
