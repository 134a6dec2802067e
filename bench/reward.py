"""CIDEr-D reward speed per SCST batch: captioner.reward.CiderD vs pycocoevalcap, in this process.

    python bench/reward.py                                   # the embedded default's training references
    python bench/reward.py --references captions_train2014.json --images 64 --samples 5

A batch is `--images` training images with `--samples` candidates each (references of the image,
perturbed: words dropped, repeated, swapped). Three ways to score it, median of `--runs`:

- ours: `CiderD` over all training references, prepared once (document frequencies, tf-idf
  vectors, norms); a batch counts only its candidates' n-grams;
- pycocoevalcap, same reward: `CiderScorer` only computes document frequencies from the references it
  is given, so the training-corpus reward needs every training image in it, once per sample;
- pycocoevalcap, batch df: `Cider().compute_score` on the batch alone (the images x samples as
  entries): cheaper, but the document frequencies then come from the batch and the reward is a
  different number (its max |difference| is printed).

Inputs are tokenized once with `tokenize_fast` for every method, so only scoring is timed. The
scorers are pure Python (dictionaries of n-grams), one core: a share of the CPU's floating-point
peak says nothing here, the speed-up over pycocoevalcap is the figure.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.roofline import timed  # noqa: E402
from captioner.results import load_references  # noqa: E402
from captioner.reward import CiderD, tokenize_fast  # noqa: E402


def default_references() -> Path:
    path = ROOT / "data" / "synthetic" / "annotations" / "captions_train.json"
    if path.is_file():
        return path
    from captioner.data.synthetic import write_dataset

    root = Path(tempfile.mkdtemp()) / "synthetic"  # conf/data/synthetic.yaml's training split
    print(f"writing the embedded default's training split to {root} ...")
    write_dataset(root=root, seed=0, sizes={"train": 4000, "val": 1, "test": 1}, image_size=64)
    return root / "annotations" / "captions_train.json"


def perturb(caption: str, rng: random.Random, vocab: list[str]) -> str:
    words = [w if rng.random() < 0.85 else rng.choice(vocab) for w in caption.split() if rng.random() > 0.1]
    return " ".join(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--references", type=Path, default=None, help="a COCO captions file (default: the embedded training split)")
    parser.add_argument("--images", type=int, default=50, help="images per batch (SCST: 50 in Rennie et al.)")
    parser.add_argument("--samples", type=int, default=5, help="sampled captions per image")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    path = args.references or default_references()
    refs = {i: [tokenize_fast(c) for c in caps] for i, caps in load_references(path).items()}
    rng = random.Random(0)
    vocab = sorted({w for caps in refs.values() for c in caps for w in c.split()})
    batch = rng.sample(list(refs), args.images)
    ids = [i for i in batch for _ in range(args.samples)]
    cands = [perturb(rng.choice(refs[i]), rng, vocab) for i in ids]

    start = time.perf_counter()
    ours_scorer = CiderD(refs)
    prepare = time.perf_counter() - start

    def ours():
        return ours_scorer.score(ids, cands)

    def corpus():  # CiderScorer over every training image, once per sample: the same reward
        out = np.zeros(len(ids))
        for k in range(args.samples):
            mine = {i: cands[j] for j, i in enumerate(ids) if j % args.samples == k}
            scorer = CiderScorer(n=4, sigma=6.0)
            for i in refs:
                scorer += (mine.get(i, ""), refs[i])
            _, scores = scorer.compute_score()
            by_id = dict(zip(refs, scores))
            out[k :: args.samples] = [by_id[i] for i in batch]
        return out

    def batch_df():  # the batch alone: df from the batch's images x samples
        gts = {j: refs[i] for j, i in enumerate(ids)}
        return Cider().compute_score(gts, {j: [c] for j, c in enumerate(cands)})[1]

    t_ours, r_ours = timed(ours, args.runs)
    t_corpus, r_corpus = timed(corpus, max(1, args.runs // 2))
    t_batch, r_batch = timed(batch_df, args.runs)

    table = Table(title=f"CIDEr-D reward for {args.images} images x {args.samples} samples = {len(ids)} captions, "
                        f"df from {len(refs)} training images ({path.name}); median of {args.runs}")
    for column in ("method", "ms / batch", "captions / s", "x pycocoevalcap (same reward)", "max |reward - ours|"):
        table.add_column(column, justify="left" if column == "method" else "right")
    rows = [("captioner.reward.CiderD", t_ours, r_ours), ("pycocoevalcap CiderScorer, training df", t_corpus, r_corpus),
            ("pycocoevalcap Cider, batch df (other reward)", t_batch, r_batch)]
    for name, seconds, rewards in rows:
        table.add_row(name, f"{1000 * seconds:.1f}", f"{len(ids) / seconds:,.0f}", f"{t_corpus / seconds:.1f}x",
                      f"{np.abs(np.asarray(rewards) - r_ours).max():.2e}")
    console = Console(width=150)
    console.print(table)
    console.print(f"preparing CiderD once (df, reference vectors): {prepare:.2f} s; pure Python on one core, so no FLOP share applies")


if __name__ == "__main__":
    main()
