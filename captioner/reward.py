"""CIDEr-D as a training reward: pycocoevalcap's `CiderScorer`, with the references prepared once.

`CiderScorer` (what `Cider().compute_score` runs) re-counts every reference's n-grams, its document
frequencies and its tf-idf vectors on every call. Self-critical training scores thousands of sampled
captions per epoch against the same training references, so here that work is done once:

- the document frequencies and `log(number of images)` come from all training references (as in
  Rennie et al.'s and ruotianluo's `coco-train-idxs`), and are cached on disk with the PTB-tokenized
  references (`CiderD.cached`), so the Java tokenizer runs once per reference set;
- each reference's tf-idf vector, norms and length are computed once; a batch only counts and weighs
  its candidates' n-grams.

The numbers are `CiderScorer`'s, term for term (tests/test_reward.py: equal to 1e-9): CIDEr-D with
n = 1..4, sigma = 6, the x10 factor, the clipped numerator min(h, r) * r, the Gaussian length penalty
on each n-gram order, and the scorer's own length, which counts bigrams (`if n == 1`), not words.
Candidates at training time are tokenized by `tokenize_fast`, a Python stand-in for the PTB
tokenizer + punctuation removal that COCOEvalCap applies (tests/test_reward.py measures agreement).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np

Ngram = tuple[str, ...]
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
# PTB splits clitics (n't, 's, 're, ...) and punctuation off words and keeps hyphenated words whole
_TOKEN = re.compile(r"[a-z0-9]+(?=n't)|n't|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[-/.&][a-z0-9]+)*|\.\.\.|--|[^\sa-z0-9]")


def tokenize_fast(caption: str) -> str:
    """Lower-cased PTB-style tokens without punctuation, as pycocoevalcap's `PTBTokenizer` returns them,
    for the model's own captions during training (no Java start per batch)."""
    return " ".join(t for t in _TOKEN.findall(caption.lower().replace("\n", " ")) if t not in PUNCTUATIONS)


def count_ngrams(caption: str, n: int = 4) -> dict[Ngram, int]:
    """`cider_scorer.precook`: counts of every 1..n-gram of a tokenized caption."""
    words = caption.split()
    counts: dict[Ngram, int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def document_frequency(references: Mapping[Hashable, Sequence[str]], n: int = 4) -> dict[Ngram, float]:
    """For each n-gram, the number of images with a reference containing it (`compute_doc_freq`)."""
    df: dict[Ngram, float] = defaultdict(float)
    for refs in references.values():
        for ngram in {g for ref in refs for g in count_ngrams(ref, n)}:
            df[ngram] += 1
    return dict(df)


class CiderD:
    """CIDEr-D of candidates against fixed, tokenized references with fixed document frequencies.

        scorer = CiderD(train_references)               # {image_id: [tokenized caption, ...]}
        scorer.score([image_id, ...], [candidate, ...]) # (N,) float64, one per candidate

    Without `df`, the document frequencies are the references' own: the scores are then exactly
    `Cider().compute_score(references, candidates)`'s per-image scores."""

    def __init__(self, references: Mapping[Hashable, Sequence[str]], df: Mapping[Ngram, float] | None = None,
                 num_images: int | None = None, n: int = 4, sigma: float = 6.0):
        if not references:
            raise ValueError("CIDEr-D needs references: got none")
        self.n, self.sigma = n, sigma
        self.df = dict(df) if df is not None else document_frequency(references, n)
        self.ref_len = math.log(float(num_images or len(references)))  # CiderScorer: log(len(crefs))
        self.refs = {i: [self._vector(count_ngrams(r, n)) for r in refs] for i, refs in references.items()}

    def _vector(self, counts: Mapping[Ngram, int]) -> tuple[dict[Ngram, float], list[float], int]:
        """`counts2vec`: (tf-idf weights, norm per n-gram order, the scorer's length: its bigram count)."""
        vec: dict[Ngram, float] = {}
        norm = [0.0] * self.n
        length = 0
        for ngram, tf in counts.items():
            order = len(ngram) - 1
            weight = float(tf) * (self.ref_len - np.log(max(1.0, self.df.get(ngram, 0.0))))
            vec[ngram] = weight
            norm[order] += weight**2
            if order == 1:  # CiderScorer's length counts bigrams (its `n == 1`), kept for parity
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score_one(self, image_id: Hashable, candidate: str) -> float:
        if image_id not in self.refs:
            raise KeyError(f"image {image_id!r} has no references in this CIDEr-D scorer")
        vec, norm, length = self._vector(count_ngrams(candidate, self.n))
        refs = self.refs[image_id]
        total = 0.0
        for ref_vec, ref_norm, ref_length in refs:
            val = [0.0] * self.n
            for ngram, weight in vec.items():
                r = ref_vec.get(ngram)
                if r is not None:
                    val[len(ngram) - 1] += min(weight, r) * r  # clipped: a repeated n-gram earns no more than the reference has
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                if norm[k] != 0 and ref_norm[k] != 0:
                    val[k] /= norm[k] * ref_norm[k]
                total += val[k] * penalty
        return total / self.n / len(refs) * 10.0

    def score(self, image_ids: Sequence[Hashable], candidates: Sequence[str]) -> np.ndarray:
        """(N,) CIDEr-D of tokenized candidate k against the references of image_ids[k]."""
        if len(image_ids) != len(candidates):
            raise ValueError(f"{len(image_ids)} image ids for {len(candidates)} candidates")
        return np.array([self.score_one(i, c) for i, c in zip(image_ids, candidates)], dtype=np.float64)

    @classmethod
    def cached(cls, references: Mapping[int, Sequence[str]], cache_dir: str | Path, tokenize=None) -> "CiderD":
        """A scorer for raw references, PTB-tokenized (`captioner.metrics.tokenize`, Java) and counted
        once: the tokens and document frequencies go to `cache_dir/cider-d-<hash>.json`, which later
        runs over the same references read instead."""
        if tokenize is None:
            from captioner.metrics import tokenize
        key = hashlib.sha256(json.dumps(sorted((int(i), list(c)) for i, c in references.items())).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"cider-d-{key}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            tokens = {int(i): caps for i, caps in saved["references"].items()}
            df = {tuple(g.split(" ")): v for g, v in saved["df"].items()}
            return cls(tokens, df=df, num_images=saved["num_images"])
        tokens = {int(i): caps for i, caps in tokenize(references).items()}
        scorer = cls(tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps({"num_images": len(tokens), "references": {str(i): c for i, c in tokens.items()},
                                    "df": {" ".join(g): v for g, v in scorer.df.items()}}))
        temp.replace(path)
        return scorer
