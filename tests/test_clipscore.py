"""CLIPScore / RefCLIPScore: Hessel et al.'s formula on fixed embeddings, and in every run's scores.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from captioner.clipscore import PROMPT, ClipScorer, clip_s, ref_clip_s


class FixedText:
    """A CLIP text tower with fixed embeddings: it must be asked for PROMPT + caption."""

    embed_dim = 3

    def __init__(self, table: dict[str, list[float]]):
        self.table, self.asked = table, []

    def encode_text(self, texts):
        self.asked += texts
        assert all(t.startswith(PROMPT) for t in texts)
        return torch.tensor([self.table[t[len(PROMPT):]] for t in texts])


def test_formula_on_fixed_embeddings():
    images = torch.tensor([[2.0, 0, 0], [0, 0, 1]])  # not unit length: the scorer normalises
    captions = torch.tensor([[1.0, 1, 0], [0, 1, -1]])
    refs = torch.tensor([[[0.0, 3, 0], [1, 0, 1]], [[0, 1, 0], [0, 0, 0]]])
    mask = torch.tensor([[True, True], [True, False]])
    s = clip_s(images, captions)
    cos1 = 1 / math.sqrt(2)
    assert s.tolist() == pytest.approx([2.5 * cos1, 0.0])  # image 2's cosine is -0.71: clipped to 0
    r = ref_clip_s(s, captions, refs, mask)
    best = cos1  # max(cos with [0,3,0] = 0.707, cos with [1,0,1] = 0.5)
    assert r[0].item() == pytest.approx(2 * (2.5 * cos1) * best / (2.5 * cos1 + best))
    assert r[1].item() == 0.0  # harmonic mean with a zero is zero, not nan


def test_scorer_prompts_candidates_and_references_and_scores_humans_leave_one_out():
    table = {"cand": [1, 1, 0], "r1": [0, 1, 0], "r2": [1, 0, 1], "r3": [1, 0, 0]}
    text = FixedText(table)
    images = torch.tensor([[1.0, 0, 0]])
    out = ClipScorer(text).score(images, ["cand"], [["r1", "r2", "r3"]])
    assert set(text.asked) == {PROMPT + c for c in table}
    cos = lambda a, b: torch.nn.functional.cosine_similarity(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), dim=0).item()
    s = 2.5 * cos(table["cand"], [1, 0, 0])
    best = max(cos(table["cand"], table[r]) for r in ("r1", "r2", "r3"))
    assert out["model"]["CLIPScore"] == pytest.approx(s)
    assert out["model"]["RefCLIPScore"] == pytest.approx(2 * s * best / (s + best))
    human_s, human_ref = [], []
    for held in ("r1", "r2", "r3"):
        hs = 2.5 * max(cos(table[held], [1, 0, 0]), 0)
        hb = max(max(cos(table[held], table[o]) for o in ("r1", "r2", "r3") if o != held), 0)
        human_s.append(hs)
        human_ref.append(2 * hs * hb / (hs + hb) if hs + hb else 0.0)
    assert out["human"]["CLIPScore"] == pytest.approx(sum(human_s) / 3)
    assert out["human"]["RefCLIPScore"] == pytest.approx(sum(human_ref) / 3)


def test_smoke_run_writes_clipscore(smoke_cfg):
    from captioner.train import run

    cfg = smoke_cfg()
    run(cfg)
    scores = json.loads((Path(cfg.paths.output_dir) / "scores.json").read_text())
    clip = scores["clipscore"]
    assert set(clip["model"]) == {"CLIPScore", "RefCLIPScore"} and set(clip["human"]) == {"CLIPScore", "RefCLIPScore"}
    assert all(0 <= v <= 2.5 for v in clip["model"].values())
    assert clip["clip"] == "the model's CLIP"


def test_the_trained_model_scores_its_own_captions_above_them_shuffled_across_images(distinct_ckpt):
    """With the model's CLIP, as every run's scores.json: a caption of this image beats another image's."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from captioner.api import Captioner
    from captioner.clipscore import score_split
    from captioner.generate import Decoding
    from captioner.results import caption_split

    datamodule = instantiate(OmegaConf.load(distinct_ckpt.parents[1] / "config.yaml").data)  # the run's stores
    datamodule.setup("test")
    captioner = Captioner.from_pretrained(distinct_ckpt)
    captions = caption_split(captioner, datamodule, "test", Decoding(strategy="greedy", max_new_tokens=20))
    ids = sorted(captions)
    assert len(ids) == 16 and len(set(captions.values())) >= 8, captions  # captions that follow the image
    own = score_split(captioner.module.encoder, datamodule, "test", captions)["scores"]["model"]
    for shift in (1, 2, 3):  # each image gets the caption of the image `shift` places on
        shuffled = {i: captions[j] for i, j in zip(ids, ids[shift:] + ids[:shift])}
        theirs = score_split(captioner.module.encoder, datamodule, "test", shuffled)["scores"]["model"]
        assert own["CLIPScore"] > theirs["CLIPScore"] + 0.2, (shift, own, theirs)
        assert own["RefCLIPScore"] > theirs["RefCLIPScore"], (shift, own, theirs)
