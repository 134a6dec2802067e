"""Datastore search speed: captioner's exact torch top-k against faiss's exact inner-product index.

    python bench/retrieval.py                          # the embedded datastore's size, and COCO's / CC3M's
    python bench/retrieval.py --sizes 20000 --dims 128 --queries 1 64

`captioner/retrieval.py` searches by one matmul of unit vectors and `torch.topk`. faiss
(`pip install faiss-cpu`, not a dependency) is the usual choice; `IndexFlatIP` is its exact search,
the same neighbours. Each row is one datastore (N captions x E dims, fp32, random unit vectors: speed
does not depend on the values) searched by a batch of B image embeddings for k = 4, median of
`--runs` after a warm-up. Both read the whole datastore once per batch, so the roofline's floor is
max(2*B*N*E FLOPs / fp32 peak, N*E*4 bytes / read bandwidth): batch 1 is bound by memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.roofline import COLUMNS, Work, probe, timed  # noqa: E402


def torch_search(store: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """What `Datastore.search` runs: (B, k) indices of the nearest unit vectors."""
    return (queries @ store.T).topk(k, dim=1).indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 600_000, 3_000_000],
                        help="datastore captions: the embedded training set, COCO's 5 x 118k, CC3M")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512], help="the tiny CLIP's, ViT-B/32's")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 64], help="image embeddings per search")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    try:
        import faiss
    except ImportError:
        faiss = None
        print("faiss is not installed (pip install faiss-cpu): torch rows only")

    torch.manual_seed(0)
    peak = probe()
    console = Console(width=150)  # the full table, in a terminal or a log file
    console.print(peak.line())
    table = Table(title=f"exact top-{args.k} search, median of {args.runs} (ms per batch)")
    for name in ("N", "E", "B", "torch ms", "faiss ms", "faiss / torch", "same top-k", *(f"torch {c}" for c in COLUMNS)):
        table.add_column(name, justify="right")
    for n in args.sizes:
        for e in args.dims:
            if n * e * 4 > 8 * 2**30:
                continue
            store = F.normalize(torch.randn(n, e), dim=-1)
            index = None
            if faiss is not None:
                index = faiss.IndexFlatIP(e)
                index.add(store.numpy())
            for b in args.queries:
                queries = F.normalize(torch.randn(b, e), dim=-1)
                ours = timed(lambda: torch_search(store, queries, args.k), args.runs)[0]
                work = Work(bytes=store.numel() * 4)
                work.flops["fp32"] = 2 * b * n * e
                row = [f"{n:,}", str(e), str(b), f"{ours * 1e3:.2f}"]
                if index is not None:
                    theirs = timed(lambda: index.search(queries.numpy(), args.k), args.runs)[0]
                    same = torch.equal(torch.from_numpy(index.search(queries.numpy(), args.k)[1]), torch_search(store, queries, args.k))
                    row += [f"{theirs * 1e3:.2f}", f"{theirs / ours:.2f}x", "yes" if same else "no"]
                else:
                    row += ["-", "-", "-"]
                table.add_row(*row, *work.cells(ours, peak))
    console.print(table)


if __name__ == "__main__":
    main()
