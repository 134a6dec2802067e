"""The metrics wrapper: the fair human baseline checked against direct pycocoevalcap calls."""

from __future__ import annotations

from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioner import metrics

# two images, three references each; the model copies one reference of image 1 and misses image 2
REFERENCES = {
    1: ["A brown dog runs across the green grass.", "A dog is running on a lawn.", "The dog sprints through a grassy field."],
    2: ["Two people ride bikes down a city street.", "Cyclists riding along a busy road.", "A pair of bicyclists on an urban street."],
}
RESULTS = {1: "A dog is running on a lawn.", 2: "A cat sleeping on a sofa."}


def direct_scores(gts: dict, res: dict) -> dict[str, float]:
    """pycocoevalcap's scorers called directly, as COCOEvalCap calls them."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n + 1}": bleu[n] for n in range(4)}
    scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    return scores


@pytest.mark.java
def test_fair_baseline_equals_direct_pycocoevalcap_calls():
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in REFERENCES.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in RESULTS.items()})
    human, model = {}, {}
    for k in range(3):  # reference k and the model, both against the other two
        others = {i: caps[:k] + caps[k + 1 :] for i, caps in gts.items()}
        for name, value in direct_scores(others, {i: [caps[k]] for i, caps in gts.items()}).items():
            human[name] = human.get(name, 0.0) + value / 3
        for name, value in direct_scores(others, res).items():
            model[name] = model.get(name, 0.0) + value / 3

    scores = metrics.report(REFERENCES, RESULTS, meteor=False, fair=True).to_dict()
    fair = scores["fair"]
    assert fair["model"] == pytest.approx(model, abs=1e-12)
    assert fair["human"] == pytest.approx(human, abs=1e-12)
    assert fair["percent_of_human"]["CIDEr"] == pytest.approx(100 * model["CIDEr"] / human["CIDEr"])
    assert scores["human"] == fair["human"] == pytest.approx(human, abs=1e-12)
    assert scores["model"] == pytest.approx(direct_scores(gts, res), abs=1e-12)  # standard: all three references
    # the standard setting counts the copied reference as a perfect match; the fair one cannot
    assert scores["model"]["Bleu_4"] > fair["model"]["Bleu_4"]
    assert list(scores) == ["model", "human", "percent_of_human", "fair"]  # what scores.json holds, in this order


@pytest.mark.java
def test_per_image_scores_average_to_the_corpus_score():
    scores = metrics.report(REFERENCES, RESULTS, meteor=False, human=False)
    corpus, per_image = scores.model, scores.per_image
    assert scores.human is None and scores.fair is None and "human" not in scores.to_dict()
    assert set(per_image) == {1, 2}
    assert (per_image[1]["CIDEr"] + per_image[2]["CIDEr"]) / 2 == pytest.approx(corpus["CIDEr"])
    assert per_image[1]["Bleu_1"] == pytest.approx(1.0) and per_image[2]["Bleu_1"] < 0.5


def test_scores_need_a_caption_for_every_image_and_two_references():
    with pytest.raises(ValueError, match="no caption"):
        metrics.report(REFERENCES, {1: "a dog"}, meteor=False)
    with pytest.raises(ValueError, match="at least two references"):
        metrics.report({1: ["a dog"]}, {1: "a dog"}, meteor=False)


def test_spice_is_detected_by_its_jars_without_a_download(tmp_path, monkeypatch):
    import pycocoevalcap.spice.get_stanford_models as models

    monkeypatch.setattr(models, "SPICEDIR", str(tmp_path))
    (tmp_path / models.SPICELIB).mkdir()
    reason = metrics.spice_missing()
    assert reason and f"{models.JAR}.jar" in reason and "get_stanford_models" in reason
    for name in (f"{models.JAR}.jar", f"{models.JAR}-models.jar"):
        (Path(tmp_path) / models.SPICELIB / name).write_bytes(b"")
    monkeypatch.setattr(metrics, "java_available", lambda: True)
    assert metrics.spice_missing() is None
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    assert "Java" in metrics.spice_missing()


def test_table_has_a_row_per_metric():
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(metrics.table({"model": {"CIDEr": 0.5, "Bleu_4": 0.25}, "percent_of_human": {"CIDEr": 50.0, "Bleu_4": 80.0}}))
    text = console.export_text()
    assert "CIDEr" in text and "50.00" in text and "80.0" in text
