"""The CIDEr-D reward equals pycocoevalcap's CiderScorer (1e-9) on the same tokenized inputs."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captioner.data.synthetic import write_dataset
from captioner.results import load_references
from captioner.reward import CiderD, tokenize_fast


def perturbed(words: list[str], rng: random.Random, vocab: list[str]) -> str:
    """A candidate near a reference: words dropped, repeated (clipping) or swapped in, length changed."""
    out = []
    for w in words:
        roll = rng.random()
        if roll < 0.15:
            continue
        out.append(w if roll < 0.8 else rng.choice(vocab))
        if rng.random() < 0.1:
            out += [w, w]
    return " ".join(out + rng.sample(vocab, rng.randint(0, 3)))


def candidates_for(refs: dict[int, list[str]], seed: int = 0) -> dict[int, str]:
    rng = random.Random(seed)
    vocab = sorted({w for caps in refs.values() for c in caps for w in c.split()})
    cands = {i: perturbed(rng.choice(caps).split(), rng, vocab) for i, caps in refs.items()}
    first = next(iter(cands))
    cands[first] = ""  # an empty caption scores 0 in both
    return cands


@pytest.fixture(scope="module")
def synthetic_refs(tmp_path_factory) -> dict[int, list[str]]:
    root = tmp_path_factory.mktemp("reward") / "synthetic"
    write_dataset(root=str(root), seed=0, sizes={"train": 300, "val": 2, "test": 2}, image_size=32)
    refs = load_references(root / "annotations" / "captions_train.json")
    return {i: [tokenize_fast(c) for c in caps] for i, caps in refs.items()}


def test_equals_pycocoevalcap_on_its_own_corpus(synthetic_refs):
    cands = candidates_for(synthetic_refs)
    ours = CiderD(synthetic_refs).score(list(cands), list(cands.values()))
    total, theirs = Cider().compute_score(synthetic_refs, {i: [c] for i, c in cands.items()})
    assert np.ptp(theirs) > 1.0  # the candidates span a real range of scores
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)
    assert abs(ours.mean() - total) < 1e-9


def test_training_document_frequencies_equal_a_scorer_over_the_whole_corpus(synthetic_refs):
    """SCST's reward: df and log(N) from every training image, a batch scores a few of them. CiderScorer
    computes df from all its references, so scoring the whole corpus gives the reference numbers."""
    cands = candidates_for(synthetic_refs, seed=1)
    scorer = CiderScorer(n=4, sigma=6.0)
    for i in synthetic_refs:
        scorer += (cands[i], synthetic_refs[i])
    _, theirs = scorer.compute_score()
    theirs = dict(zip(synthetic_refs, theirs))
    reward = CiderD(synthetic_refs)
    batch = random.Random(2).sample(list(synthetic_refs), 40)
    batch_only = CiderD({i: synthetic_refs[i] for i in batch}).score(batch, [cands[i] for i in batch])
    ours = reward.score(batch, [cands[i] for i in batch])
    np.testing.assert_allclose(ours, [theirs[i] for i in batch], rtol=0, atol=1e-9)
    assert np.abs(batch_only - ours).max() > 1e-3  # the document frequencies matter: a batch's own df differs


@pytest.mark.java
def test_equals_pycocoevalcap_on_ptb_tokenized_coco(coco_mini, tmp_path):
    from captioner.metrics import tokenize

    refs = load_references(coco_mini / "annotations" / "captions_val2017_subset159.json")
    calls = []

    def counting(captions):
        calls.append(len(captions))
        return tokenize(captions)

    reward = CiderD.cached(refs, tmp_path, tokenize=counting)
    again = CiderD.cached(refs, tmp_path, tokenize=counting)  # read from the cache: no second Java run
    assert calls == [len(refs)]
    gts = tokenize(refs)
    cands = candidates_for(gts, seed=3)
    _, theirs = Cider().compute_score(gts, {i: [c] for i, c in cands.items()})
    for scorer in (reward, again):
        np.testing.assert_allclose(scorer.score(list(cands), list(cands.values())), theirs, rtol=0, atol=1e-9)


@pytest.mark.java
def test_fast_tokenizer_agrees_with_ptb(coco_mini):
    from captioner.metrics import tokenize

    refs = load_references(coco_mini / "annotations" / "captions_val2017_subset159.json")
    ptb = tokenize(refs)
    pairs = [(tokenize_fast(raw), tok) for i in refs for raw, tok in zip(refs[i], ptb[i])]
    agree = sum(a == b for a, b in pairs) / len(pairs)
    assert agree > 0.97, [p for p in pairs if p[0] != p[1]][:5]


def test_unknown_image_is_named():
    with pytest.raises(KeyError, match="image 7"):
        CiderD({1: ["a red circle"]}).score([7], ["a red circle"])
