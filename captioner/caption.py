"""python -m captioner.caption --ckpt last.ckpt photos/ "more/*.jpg" a.png [-o captions.jsonl|.csv]

Captions files, globs and folders (searched recursively for image files) in batches with a
progress bar; prints `file<TAB>caption` lines, or writes JSONL / CSV rows of (file, caption).
Files that cannot be decoded are reported on stderr and skipped.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mpo"}


def expand(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(files in order without repeats, inputs that matched nothing). Files named outright are taken
    whatever their suffix (the type is read from the bytes); folders and globs keep image suffixes."""
    files: dict[Path, None] = {}
    unmatched = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            found = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            unmatched.append(item)
        files.update(dict.fromkeys(found))
    return list(files), unmatched


class Writer:
    """Rows of (file, caption) to stdout (tab-separated), JSONL or CSV, flushed per batch. A file is written
    under a temporary name beside it and renamed over `out` by `close()`: a run that fails or is killed
    leaves an earlier output file as it was."""

    def __init__(self, out: Path | None, fmt: str | None):
        self.fmt = fmt or (out.suffix.lstrip(".").lower() if out else "text")
        if self.fmt not in ("text", "jsonl", "csv"):
            raise SystemExit(f"error: cannot tell the output format of {out}: name it .jsonl or .csv, or pass --format")
        self.out = out
        self.temp = out.with_name(f".{out.name}.{os.getpid()}.tmp") if out else None
        self.stream = open(self.temp, "w", newline="", encoding="utf-8") if out else None
        self.csv = csv.writer(self.stream) if self.fmt == "csv" else None
        if self.csv:
            self.csv.writerow(["file", "caption"])

    def write(self, rows: list[tuple[str, str]]) -> None:
        for file, caption in rows:
            if self.stream is None:
                tqdm.write(f"{file}\t{caption}")
            elif self.csv:
                self.csv.writerow([file, caption])
            else:
                self.stream.write(json.dumps({"file": file, "caption": caption}, ensure_ascii=False) + "\n")
        if self.stream:
            self.stream.flush()

    def close(self) -> None:
        """The whole output in place of `out`."""
        if self.stream:
            self.stream.close()
            os.replace(self.temp, self.out)

    def abandon(self) -> None:
        """A failed run: the partial output is dropped, `out` keeps what it held."""
        if self.stream:
            self.stream.close()
            self.temp.unlink(missing_ok=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m captioner.caption", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or quoted globs such as 'photos/**/*.jpg'")
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint (.ckpt), an exported directory, or a Hub repo id (user/repo)")
    parser.add_argument("-o", "--out", type=Path, help="write rows here (.jsonl or .csv) instead of printing them")
    parser.add_argument("--format", choices=["text", "jsonl", "csv"], help="output format when --out's suffix does not say")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    # unset options take captioner.generate.Decoding's defaults (greedy; beam width 3; 30 tokens)
    parser.add_argument("--strategy", choices=["greedy", "beam"], help="default: greedy")
    parser.add_argument("--num-beams", type=int, help="beam width (beam only); default: 3")
    parser.add_argument("--max-new-tokens", type=int, help="default: 30")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--int8", action="store_true", help="int8 dynamic quantization for CPU inference")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="CLIP's and GPT-2's weights (the mapper stays fp32)")
    parser.add_argument("--engine", choices=["torch", "onnx"], default="torch", help="onnx: an export's ONNX graphs in ONNX Runtime (export with onnx=true)")
    parser.add_argument("--datastore", help="a retrieval model's datastore directory in place of its own (captioner/retrieval.py)")
    parser.add_argument("--encoder", help="a CLIP file to load instead of the one the checkpoint names (vouches for a TorchScript file)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files, unmatched = expand(args.inputs)
    for item in unmatched:
        print(f"warning: {item} matched no image file", file=sys.stderr)
    if not files:
        print("error: no image files to caption", file=sys.stderr)
        return 2
    from captioner.api import Captioner  # imported here so that --help and argument errors answer at once
    from captioner.generate import decoding_from

    from captioner.models.hub import MissingWeightsError

    try:  # a missing or foreign checkpoint, absent weights: one line, no traceback
        captioner = Captioner.from_pretrained(args.ckpt, device=args.device, int8=args.int8, precision=args.precision,
                                             datastore=args.datastore, engine=args.engine, encoder=args.encoder)
    except (FileNotFoundError, ValueError, MissingWeightsError) as e:
        print(f"error: {e} (--ckpt)", file=sys.stderr)
        return 2
    given = {"strategy": args.strategy, "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    decoding = decoding_from({k: v for k, v in given.items() if v is not None})
    if decoding.max_new_tokens > captioner.max_new_tokens:
        print(f"error: --max-new-tokens {decoding.max_new_tokens}: this model writes at most {captioner.max_new_tokens}", file=sys.stderr)
        return 2
    writer = Writer(args.out, args.format)
    skipped: list[tuple[Path, str]] = []
    try:
        done = _caption_all(files, captioner, decoding, args.batch_size, writer, skipped)
    except BaseException:
        writer.abandon()
        raise
    writer.close()
    where = f" -> {args.out}" if args.out else ""
    print(f"captioned {done} image(s){where}; skipped {len(skipped)}", file=sys.stderr)
    return 0 if done else 1


def _caption_all(files: list[Path], captioner, decoding, batch_size: int, writer: Writer, skipped: list) -> int:
    """Caption `files` in batches into `writer`; unreadable files go to `skipped`. Returns how many were captioned."""
    import torch

    from captioner.data.images import to_pil

    done = 0
    with tqdm(total=len(files), unit="img", desc="caption", file=sys.stderr) as bar:
        for start in range(0, len(files), batch_size):
            names, pixels, batch = [], [], files[start : start + batch_size]
            for path in batch:
                try:
                    pixels.append(captioner.preprocess(to_pil(path)))
                    names.append(str(path))
                except ValueError as e:  # load_image's error names the file and why
                    skipped.append((path, str(e)))
                    tqdm.write(f"skipped: {e}", file=sys.stderr)
            if pixels:
                captions = captioner.caption_pixels(torch.stack(pixels), decoding)  # (B, 3, R, R)
                writer.write([(name, c.text) for name, c in zip(names, captions)])
                done += len(names)
            bar.update(len(batch))
    return done


if __name__ == "__main__":
    sys.exit(main())
