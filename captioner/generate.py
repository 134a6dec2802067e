"""Decoding: the one implementation used by validation, evaluation, the CLI and the web app."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Decoding:
    strategy: str = "greedy"  # greedy | beam | sample
    num_beams: int = 5  # beam only
    length_penalty: float = 1.0  # beam only: > 1 favours longer captions
    temperature: float = 1.0  # sample only
    top_k: int = 0  # sample only; 0 = off
    top_p: float = 1.0  # sample only; 1 = off
    max_new_tokens: int = 30

    def __post_init__(self):
        if self.strategy not in ("greedy", "beam", "sample"):
            raise ValueError(f"decoding strategy {self.strategy!r} is not one of greedy, beam, sample")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "use_cache": True}
        if self.strategy == "greedy":
            return {**kwargs, "do_sample": False, "num_beams": 1}
        if self.strategy == "beam":
            return {**kwargs, "do_sample": False, "num_beams": self.num_beams, "length_penalty": self.length_penalty, "early_stopping": True}
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


@torch.no_grad()
def generate_ids(decoder, tokenizer, prefix: torch.Tensor, decoding: Decoding) -> list[list[int]]:
    """Token ids (end-of-text removed) for each prefix in the batch; prefix is (B, P, D)."""
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    eos = tokenizer.eos_token_id
    out = decoder.generate(
        inputs_embeds=prefix,
        attention_mask=mask,
        eos_token_id=eos,
        pad_token_id=eos,
        **decoding.generate_kwargs(),
    )  # (B, new tokens): with inputs_embeds only, generate returns just the continuation
    captions = []
    for row in out.tolist():
        captions.append(row[: row.index(eos)] if eos in row else row)
    return captions


def generate(decoder, tokenizer, prefix: torch.Tensor, decoding: Decoding | None = None) -> list[str]:
    ids = generate_ids(decoder, tokenizer, prefix, decoding or Decoding())
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def decoding_from(config) -> Decoding:
    """A Decoding from a mapping (Hydra config) that may hold only some of the fields."""
    values, known = dict(config or {}), asdict(Decoding())
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown decoding option(s) {unknown}: choose from {sorted(known)}")
    return Decoding(**values)
