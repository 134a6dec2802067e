"""CLIPScore and RefCLIPScore (Hessel et al. 2021), beside the official metrics in every scores.json.

    CLIP-S(c, v)       = w * max(cos(E_c, E_v), 0)                      w = 2.5
    RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(E_c, E_r), 0))

E_c and E_r embed "A photo depicts " + the caption (candidates and references alike, as the authors'
clipscore.py does) with CLIP's text tower, E_v is CLIP's `encode_image`; all are L2-normalised. The
corpus scores are means over images. The CLIP is the model's own (its image features then come from
the feature store) or any CLIP by name or local path (`clipscore.model=ViT-B/32`, never downloaded:
a name needs the weights in ~/.cache/clip). The scores mean something only when CLIP's image and text
towers were trained together: a randomly initialised CLIP gives numbers that say nothing.

Humans get the same leave-one-out treatment as in captioner/metrics.py: reference k is the candidate
and the other K-1 references are R.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

PROMPT = "A photo depicts "  # the authors' prefix (CLIPCapDataset: "A photo depicts" plus a space)
W = 2.5  # rescales cosines, which rarely exceed 0.4 for ViT-B/32, towards [0, 1]


def clip_s(image: torch.Tensor, caption: torch.Tensor, w: float = W) -> torch.Tensor:
    """(N,) CLIP-S of caption embeddings (N, E) against image embeddings (N, E), normalised here."""
    return w * (F.normalize(image.double(), dim=-1) * F.normalize(caption.double(), dim=-1)).sum(-1).clamp(min=0)


def ref_clip_s(clip_score: torch.Tensor, caption: torch.Tensor, references: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) harmonic mean of CLIP-S (N,) and the best reference cosine, clipped at 0; references (N, K, E)
    with mask (N, K) true where a reference exists."""
    cos = torch.einsum("ne,nke->nk", F.normalize(caption.double(), dim=-1), F.normalize(references.double(), dim=-1))
    best = cos.masked_fill(~mask, -1.0).amax(dim=1).clamp(min=0)  # (N,)
    total = clip_score + best
    return torch.where(total > 0, 2 * clip_score * best / total.clamp(min=1e-12), torch.zeros_like(total))


class ClipScorer:
    """CLIPScore / RefCLIPScore with one CLIP (a `ClipEncoder`: image tower + text tower)."""

    def __init__(self, encoder, batch_size: int = 256):
        self.encoder, self.batch_size = encoder, batch_size

    @torch.no_grad()
    def embed_text(self, captions: Sequence[str]) -> torch.Tensor:
        """(N, E) text embeddings of PROMPT + caption."""
        out = [self.encoder.encode_text([PROMPT + c for c in captions[s : s + self.batch_size]])
               for s in range(0, len(captions), self.batch_size)]
        return torch.cat(out).double() if out else torch.zeros(0, self.encoder.embed_dim, dtype=torch.float64)

    @torch.no_grad()
    def embed_images(self, paths: Sequence) -> torch.Tensor:
        """(N, E) `encode_image` of image files, with this CLIP's preprocessing."""
        from captioner.data.images import load_image

        out = []
        for s in tqdm(range(0, len(paths), 64), desc="CLIPScore images", unit="batch", leave=False):
            pixels = torch.stack([self.encoder.preprocess(load_image(p)) for p in paths[s : s + 64]])
            out.append(self.encoder(pixels)["clip_features"])
        return torch.cat(out).double()

    def score(self, images: torch.Tensor, captions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
        """{"model": {CLIPScore, RefCLIPScore}, "human": the same by leave-one-out, "per_image": [...]}.
        images (N, E) are CLIP image embeddings in the order of captions and references."""
        if not (len(images) == len(captions) == len(references)):
            raise ValueError(f"{len(images)} images, {len(captions)} captions and {len(references)} reference lists")
        k = max(len(r) for r in references)
        flat = [r for refs in references for r in refs]
        flat_emb = self.embed_text(flat)
        refs = torch.zeros(len(references), k, flat_emb.shape[-1], dtype=torch.float64)
        mask = torch.zeros(len(references), k, dtype=torch.bool)
        start = 0
        for i, rs in enumerate(references):
            refs[i, : len(rs)], mask[i, : len(rs)] = flat_emb[start : start + len(rs)], True
            start += len(rs)
        cand = self.embed_text(list(captions))
        model_s = clip_s(images, cand)
        model_ref = ref_clip_s(model_s, cand, refs, mask)
        rounds = min(len(r) for r in references)
        human_s = human_ref = 0.0
        if rounds >= 2:
            for j in range(rounds):  # reference j against the image and the other references
                others = mask.clone()
                others[:, j] = False
                s = clip_s(images, refs[:, j])
                human_s += s.mean().item() / rounds
                human_ref += ref_clip_s(s, refs[:, j], refs, others).mean().item() / rounds
        scores = {
            "model": {"CLIPScore": model_s.mean().item(), "RefCLIPScore": model_ref.mean().item()},
            "per_image": [{"CLIPScore": a, "RefCLIPScore": b} for a, b in zip(model_s.tolist(), model_ref.tolist())],
        }
        if rounds >= 2:
            scores["human"] = {"CLIPScore": human_s, "RefCLIPScore": human_ref}
        return scores


def load_scorer(model_encoder, spec: str | Mapping | None = None) -> tuple[ClipScorer, bool]:
    """(scorer, own): the model's CLIP when `spec` is None, else the CLIP that `spec` names or builds."""
    if spec is None:
        return ClipScorer(model_encoder), True
    from captioner.models.towers import build_encoder
    from captioner.models.hub import MissingWeightsError

    try:
        return ClipScorer(build_encoder(spec)), False
    except (ValueError, MissingWeightsError) as e:  # the loader names model.encoder: this CLIP is clipscore.model's
        raise type(e)(str(e).replace("model.encoder", "clipscore.model")) from None


def score_split(module_encoder, datamodule, split: str, captions: Mapping[int, str], spec: str | Mapping | None = None) -> dict:
    """CLIPScore / RefCLIPScore of `captions` ({image_id: caption}) on `split`; with the model's CLIP the
    image embeddings are the feature store's `clip_features`, with another CLIP the images are encoded."""
    scorer, own = load_scorer(module_encoder, spec)
    records = [r for r in datamodule.records[split] if r.image_id in captions]
    if own:
        store = datamodule.datasets[split].store
        images = torch.stack([store.features(r.image_id)["clip_features"].double() for r in records])
    else:
        images = scorer.embed_images([r.path for r in records])
    result = scorer.score(images, [captions[r.image_id] for r in records], [r.captions for r in records])
    per_image = dict(zip((r.image_id for r in records), result.pop("per_image")))
    result["clip"] = "the model's CLIP" if own else str(spec)
    return {"scores": result, "per_image": per_image}


def add_to(scores: dict, clip: dict) -> dict:
    """`scores` (a scores.json dict) with "clipscore": {model, human, clip} beside the official metrics."""
    scores["clipscore"] = clip["scores"]
    return scores


def print_table(scores: Mapping) -> None:
    from rich.console import Console
    from rich.table import Table

    clip = scores["clipscore"]
    t = Table(title=f"CLIPScore (w = {W}, '{PROMPT.strip()} ...'), CLIP: {clip['clip']}")
    t.add_column("metric")
    for column in ("model", "human"):
        if column in clip:
            t.add_column(column + (" (leave-one-out)" if column == "human" else ""), justify="right")
    for metric in clip["model"]:
        t.add_row(metric, *[f"{clip[c][metric]:.4f}" for c in ("model", "human") if c in clip])
    Console().print(t)
