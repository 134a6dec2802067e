"""Official caption metrics (pycocoevalcap) and the human baselines.

Scores follow `COCOEvalCap.evaluate()` exactly: captions go through the PTB tokenizer, then each
official scorer runs on the tokenized text, images in the references' order. The METEOR scorer
starts a Java process (~7 s), so one instance is kept per process. SPICE runs only when its
Stanford CoreNLP jars are already installed: pycocoevalcap's own `Spice()` would start a download.

Two comparisons with humans (K references per image):
- standard: the model against all K references; humans by leave-one-out (reference k against the
  other K-1, averaged over k). The model has one more reference than the humans, which favours it.
- fair: for each k, the model's caption *and* reference k are both scored against the same K-1
  other references; both are averaged over k.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")

References = Mapping[int, Sequence[str]]  # image_id -> human captions
Results = Mapping[int, str]  # image_id -> one generated caption
Tokens = Mapping[int, list[str]]  # image_id -> PTB-tokenized captions
PerImage = dict[int, dict[str, float]]  # image_id -> {metric: score}


def java_available() -> bool:
    return shutil.which("java") is not None


def spice_missing() -> str | None:
    """Why SPICE cannot run here, or None when it can. Checks files only: never downloads."""
    import pycocoevalcap.spice.get_stanford_models as models

    lib = Path(models.SPICEDIR) / models.SPICELIB
    wanted = [lib / f"{models.JAR}.jar", lib / f"{models.JAR}-models.jar"]
    absent = [p.name for p in wanted if not p.is_file()]
    if absent:
        return (
            f"Stanford CoreNLP jars {absent} are not in {lib}; install them with "
            "`python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()'` (needs network)"
        )
    if not java_available():
        return "SPICE needs Java: install a JRE (e.g. apt-get install default-jre)"
    return None


@functools.cache
def _meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def tokenize(captions: Mapping[object, Sequence[str]]) -> dict[object, list[str]]:
    """PTB-tokenize (Java) as COCOEvalCap does: {key: [caption, ...]} -> the same, tokenized."""
    if not java_available():
        raise RuntimeError("the PTB tokenizer and METEOR need Java: install a JRE (e.g. apt-get install default-jre)")
    return PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in captions.items()})


def metric_names(meteor: bool = True, spice: bool = False) -> list[str]:
    return [m for m in METRICS if (m != "METEOR" or meteor) and (m != "SPICE" or spice)]


def evaluate_tokenized(gts: Tokens, res: Tokens, meteor: bool = True, spice: bool = False) -> tuple[dict[str, float], PerImage]:
    """(corpus scores, per-image scores) of tokenized candidates `res` ({id: [one caption]}) against
    references `gts`, exactly as `COCOEvalCap.evaluate` computes them."""
    gts, res = dict(gts), {i: res[i] for i in gts}  # every scorer walks the ids in gts' order
    ids = list(gts)
    corpus: dict[str, float] = {}
    per_image: PerImage = {i: {} for i in ids}

    def keep(name: str, total, values) -> None:
        corpus[name] = float(total)
        for i, v in zip(ids, values):
            per_image[i][name] = float(v)

    bleu, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        keep(f"Bleu_{n + 1}", bleu[n], bleu_images[n])
    if meteor:
        keep("METEOR", *_meteor().compute_score(gts, res))
    keep("ROUGE_L", *Rouge().compute_score(gts, res))
    keep("CIDEr", *Cider().compute_score(gts, res))
    if spice:
        reason = spice_missing()
        if reason:
            raise RuntimeError(f"SPICE is unavailable: {reason}")
        from pycocoevalcap.spice.spice import Spice

        total, images = Spice().compute_score(gts, res)  # per-image results come in sorted id order
        by_id = dict(zip(sorted(ids), images))
        keep("SPICE", total, [by_id[i]["All"]["f"] for i in ids])
    return corpus, per_image


def score_tokenized(gts: Tokens, res: Tokens, meteor: bool = True, spice: bool = False) -> dict[str, float]:
    """Corpus scores of tokenized candidates `res` ({id: [one caption]}) against references `gts`."""
    return evaluate_tokenized(gts, res, meteor, spice)[0]


def _check(references: References, results: Results | None = None) -> None:
    if not references:
        raise ValueError("no references to score against")
    if results is not None:
        missing = set(references) - set(results)
        if missing:
            raise ValueError(f"{len(missing)} images have references but no caption, e.g. {sorted(missing)[:5]}")


def _tokenize_both(references: References, results: Results | None) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """One PTB run (one Java start) for references and results; the tokenizer works line by line,
    so this gives the same tokens as COCOEvalCap's two separate runs."""
    ids = list(references)
    captions = {("ref", i): list(references[i]) for i in ids}
    if results is not None:
        captions.update({("res", i): [results[i]] for i in ids})
    tokens = tokenize(captions)
    gts = {i: tokens[("ref", i)] for i in ids}
    res = {i: tokens[("res", i)] for i in ids} if results is not None else {}
    return gts, res


def evaluate(references: References, results: Results, meteor: bool = True, spice: bool = False) -> tuple[dict[str, float], PerImage]:
    """(corpus scores, per-image scores) of one caption per image against all its references."""
    _check(references, results)
    gts, res = _tokenize_both(references, results)
    return evaluate_tokenized(gts, res, meteor, spice)


def score(references: References, results: Results, meteor: bool = True, spice: bool = False) -> dict[str, float]:
    """Official corpus scores of one caption per image against its references."""
    return evaluate(references, results, meteor, spice)[0]


def _leave_one_out(gts: Tokens, res: Tokens | None, meteor: bool, spice: bool) -> tuple[dict[str, float], dict[str, float] | None]:
    """Averages over k of (reference k vs the other K-1, the model vs the same K-1).

    Images may have different K (COCO has a few with 6 or 7): every image takes part in rounds
    k = 0 .. min(K)-1, so each round scores every image once."""
    rounds = min(len(caps) for caps in gts.values())
    if rounds < 2:
        raise ValueError("a human baseline needs at least two references per image")
    names = metric_names(meteor, spice)
    human = dict.fromkeys(names, 0.0)
    model = dict.fromkeys(names, 0.0) if res is not None else None
    for k in range(rounds):
        others = {i: caps[:k] + caps[k + 1 :] for i, caps in gts.items()}
        held_out = {i: [caps[k]] for i, caps in gts.items()}
        for name, value in score_tokenized(others, held_out, meteor, spice).items():
            human[name] += value / rounds
        if res is not None:
            for name, value in score_tokenized(others, res, meteor, spice).items():
                model[name] += value / rounds
    return human, model


def human_baseline(references: References, meteor: bool = True, spice: bool = False) -> dict[str, float]:
    """Leave-one-out: reference k of every image is scored against the image's other references,
    for each k; the scores are averaged over k."""
    _check(references)
    gts, _ = _tokenize_both(references, None)
    return _leave_one_out(gts, None, meteor, spice)[0]


def fair_baseline(references: References, results: Results, meteor: bool = True, spice: bool = False) -> dict[str, dict[str, float]]:
    """{"model", "human", "percent_of_human"} with both sides scored against the same K-1 references."""
    _check(references, results)
    gts, res = _tokenize_both(references, results)
    human, model = _leave_one_out(gts, res, meteor, spice)
    return {"model": model, "human": human, "percent_of_human": percent_of(model, human)}


def percent_of(model: Mapping[str, float], human: Mapping[str, float]) -> dict[str, float]:
    return {k: 100.0 * model[k] / human[k] if human[k] else float("nan") for k in model}


def report(
    references: References, results: Results, meteor: bool = True, spice: bool = False, fair: bool = False
) -> tuple[dict[str, dict], PerImage]:
    """({"model", "human", "percent_of_human"[, "fair"]}, per-image scores of the model against all
    references). "model" is against all K references, "human" by leave-one-out; with `fair`, also
    {"fair": {"model", "human", "percent_of_human"}} where the model is scored against the same K-1
    references as the humans. One PTB run for everything."""
    _check(references, results)
    gts, res = _tokenize_both(references, results)
    model, per_image = evaluate_tokenized(gts, res, meteor, spice)
    human, model_fair = _leave_one_out(gts, res if fair else None, meteor, spice)
    scores: dict[str, dict] = {"model": model, "human": human, "percent_of_human": percent_of(model, human)}
    if fair:
        scores["fair"] = {"model": model_fair, "human": human, "percent_of_human": percent_of(model_fair, human)}
    return scores, per_image


def score_with_human(
    references: References, results: Results, meteor: bool = True, spice: bool = False, fair: bool = False
) -> dict[str, dict]:
    """The scores of `report`, without the per-image ones."""
    return report(references, results, meteor, spice, fair)[0]


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
            row.append(f"{v:.1f}" if column.startswith("percent") or column.startswith("%") else f"{100 * v:.2f}")
        t.add_row(*row)
    return t
