"""Official caption metrics (pycocoevalcap) and the human baselines.

Scores follow `COCOEvalCap.evaluate()` exactly: captions go through the PTB tokenizer, then each
official scorer runs on the tokenized text, images in the references' order. The METEOR scorer
starts a Java process (~7 s), so one instance is kept per process. SPICE runs only when its
Stanford CoreNLP jars are already installed: pycocoevalcap's own `Spice()` would start a download.

One public entry, `report(references, captions, ...)`, returns a `Report`: the model's corpus and
per-image scores, the human baselines when asked, and `to_dict()`, the `scores.json` every entry
point writes; further sections (e.g. another metric) go into `Report.sections`.

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
from dataclasses import dataclass, field
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


def _names(meteor: bool, spice: bool) -> list[str]:
    return [m for m in METRICS if (m != "METEOR" or meteor) and (m != "SPICE" or spice)]


def _score_tokenized(gts: Tokens, res: Tokens, meteor: bool, spice: bool) -> tuple[dict[str, float], PerImage]:
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
        from pycocoevalcap.spice.spice import Spice

        total, images = Spice().compute_score(gts, res)  # per-image results come in sorted id order
        by_id = dict(zip(sorted(ids), images))
        keep("SPICE", total, [by_id[i]["All"]["f"] for i in ids])
    return corpus, per_image


def _tokenize_both(references: References, results: Results) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """One PTB run (one Java start) for references and results; the tokenizer works line by line,
    so this gives the same tokens as COCOEvalCap's two separate runs."""
    ids = list(references)
    captions = {("ref", i): list(references[i]) for i in ids}
    captions.update({("res", i): [results[i]] for i in ids})
    tokens = tokenize(captions)
    return {i: tokens[("ref", i)] for i in ids}, {i: tokens[("res", i)] for i in ids}


def _leave_one_out(gts: Tokens, res: Tokens | None, meteor: bool, spice: bool) -> tuple[dict[str, float], dict[str, float] | None]:
    """Averages over k of (reference k vs the other K-1, the model vs the same K-1).

    Images may have different K (COCO has a few with 6 or 7): every image takes part in rounds
    k = 0 .. min(K)-1, so each round scores every image once."""
    rounds = min(len(caps) for caps in gts.values())  # >= 2: checked by report
    names = _names(meteor, spice)
    human = dict.fromkeys(names, 0.0)
    model = dict.fromkeys(names, 0.0) if res is not None else None
    for k in range(rounds):
        others = {i: caps[:k] + caps[k + 1 :] for i, caps in gts.items()}
        held_out = {i: [caps[k]] for i, caps in gts.items()}
        for name, value in _score_tokenized(others, held_out, meteor, spice)[0].items():
            human[name] += value / rounds
        if res is not None:
            for name, value in _score_tokenized(others, res, meteor, spice)[0].items():
                model[name] += value / rounds
    return human, model


def _percent_of(model: Mapping[str, float], human: Mapping[str, float]) -> dict[str, float]:
    return {k: 100.0 * model[k] / human[k] if human[k] else float("nan") for k in model}


@dataclass
class Report:
    """What `report` computed. `model` and `per_image` score the caption of each image against all
    its K references; `human` is the leave-one-out baseline; `fair` = {"model", "human",
    "percent_of_human"} with both sides against the same K-1 references; `unavailable` names the
    metrics asked for that could not run, with why; `sections` holds further parts of `scores.json`."""

    model: dict[str, float]
    per_image: PerImage
    human: dict[str, float] | None = None
    fair: dict[str, dict[str, float]] | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    sections: dict[str, object] = field(default_factory=dict)

    @property
    def percent_of_human(self) -> dict[str, float] | None:
        return None if self.human is None else _percent_of(self.model, self.human)

    def to_dict(self) -> dict:
        """`scores.json`: `{"model", "human", "percent_of_human"[, "fair"][, "unavailable"], *sections}`."""
        out: dict = {"model": self.model}
        if self.human is not None:
            out.update(human=self.human, percent_of_human=self.percent_of_human)
        if self.fair is not None:
            out["fair"] = self.fair
        if self.unavailable:
            out["unavailable"] = self.unavailable
        return {**out, **self.sections}


def report(
    references: References,
    results: Results,
    meteor: bool = True,
    spice: bool | str = False,
    human: bool = True,
    fair: bool = False,
) -> Report:
    """Official scores of one caption per image (`results`) against its references.

    `spice`: True (fail when it cannot run), False, or "auto" (run it when its jars and Java are
    present, else list it in `unavailable`). `human`: also the leave-one-out baseline (needs >= 2
    references per image); `fair`: also the fair pair. One PTB run for everything."""
    if not references:
        raise ValueError("no references to score against")
    missing = set(references) - set(results)
    if missing:
        raise ValueError(f"{len(missing)} images have references but no caption, e.g. {sorted(missing)[:5]}")
    if (human or fair) and min(len(caps) for caps in references.values()) < 2:
        raise ValueError("a human baseline needs at least two references per image (or human=False)")
    unavailable = {}
    if spice:
        reason = spice_missing()
        if reason and spice is True:
            raise RuntimeError(f"SPICE is unavailable: {reason} (or set spice=auto)")
        if reason:
            unavailable["SPICE"] = reason
        spice = not reason
    gts, res = _tokenize_both(references, results)
    model, per_image = _score_tokenized(gts, res, meteor, spice)
    out = Report(model, per_image, unavailable=unavailable)
    if human or fair:
        out.human, model_fair = _leave_one_out(gts, res if fair else None, meteor, spice)
        if fair:
            out.fair = {"model": model_fair, "human": out.human, "percent_of_human": _percent_of(model_fair, out.human)}
    return out


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
