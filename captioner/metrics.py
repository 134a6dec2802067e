"""Official caption metrics (pycocoevalcap) and the human leave-one-out baseline.

Scores follow `COCOEvalCap.evaluate()` exactly: captions go through the PTB tokenizer once, then
each official scorer runs on the tokenized text. The METEOR scorer starts a Java process (~7 s),
so one instance is kept per process.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

References = Mapping[int, Sequence[str]]  # image_id -> human captions
Results = Mapping[int, str]  # image_id -> one generated caption


def java_available() -> bool:
    return shutil.which("java") is not None


@functools.cache
def _meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def tokenize(captions: Mapping[int, Sequence[str]]) -> dict[int, list[str]]:
    """PTB-tokenize (Java) as COCOEvalCap does: {image_id: [caption, ...]} -> the same, tokenized."""
    if not java_available():
        raise RuntimeError("the PTB tokenizer and METEOR need Java: install a JRE (e.g. apt-get install default-jre)")
    return PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in captions.items()})


def score_tokenized(gts: Mapping[int, list[str]], res: Mapping[int, list[str]], meteor: bool = True) -> dict[str, float]:
    """Corpus scores of tokenized candidates `res` ({id: [one caption]}) against references `gts`."""
    gts, res = dict(gts), dict(res)
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if meteor:
        scores["METEOR"] = float(_meteor().compute_score(gts, res)[0])
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def score(references: References, results: Results, meteor: bool = True) -> dict[str, float]:
    """Official corpus scores of one caption per image against its references."""
    missing = set(references) - set(results)
    if missing:
        raise ValueError(f"{len(missing)} images have references but no caption, e.g. {sorted(missing)[:5]}")
    ids = list(references)
    tokens = tokenize({**{("ref", i): references[i] for i in ids}, **{("res", i): [results[i]] for i in ids}})
    gts = {i: tokens[("ref", i)] for i in ids}
    res = {i: tokens[("res", i)] for i in ids}
    return score_tokenized(gts, res, meteor)


def human_baseline(references: References, meteor: bool = True) -> dict[str, float]:
    """Leave-one-out: reference k of every image is scored against the image's other references,
    for each k; the scores are averaged over k."""
    tokens = tokenize(references)
    rounds = min(len(caps) for caps in tokens.values())
    if rounds < 2:
        raise ValueError("the human baseline needs at least two references per image")
    totals = dict.fromkeys(METRICS if meteor else [m for m in METRICS if m != "METEOR"], 0.0)
    for k in range(rounds):
        gts = {i: caps[:k] + caps[k + 1 :] for i, caps in tokens.items()}
        res = {i: [caps[k]] for i, caps in tokens.items()}
        for name, value in score_tokenized(gts, res, meteor).items():
            totals[name] += value / rounds
    return totals


def score_with_human(references: References, results: Results, meteor: bool = True) -> dict[str, dict[str, float]]:
    """{"model", "human", "percent_of_human"}: the model against all references, humans by leave-one-out."""
    model = score(references, results, meteor)
    human = human_baseline(references, meteor)
    percent = {k: 100.0 * model[k] / human[k] if human[k] else float("nan") for k in model}
    return {"model": model, "human": human, "percent_of_human": percent}


def table(scores: Mapping[str, Mapping[str, float]], title: str = "scores"):
    """A rich table: one row per metric, one column per entry of `scores` (scaled x100 except %)."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    for column in scores:
        t.add_column(column, justify="right")
    for metric in next(iter(scores.values())):
        row = [metric]
        for column, values in scores.items():
            v = values.get(metric, float("nan"))
            row.append(f"{v:.1f}" if column.startswith("percent") else f"{100 * v:.2f}")
        t.add_row(*row)
    return t
