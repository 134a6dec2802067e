"""Decoding: the one implementation used by validation, evaluation, the CLI and the web app.

Two engines give the same greedy and beam captions (tests/test_generate.py checks it token for token):
- `cached` (default): our batched loop over GPT-2's KV cache. It runs the prefix once per image
  (not once per beam), keeps only the last position's logits, and has none of `generate`'s
  per-step bookkeeping; with an int8 decoder (captioner/quantize.py) it is the fast CPU path
  (bench/decode.py has the numbers).
- `hf`: transformers' `generate(inputs_embeds=...)`, the reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

NEG = -1.0e9  # a score no live hypothesis reaches (transformers' beam search uses the same)


@dataclass(frozen=True)
class Decoding:
    """How captions are decoded. Its defaults are the project's one default decoding: the API, the CLI,
    the web app and validation read them; the configs name only what they change (evaluation: beam)."""

    strategy: str = "greedy"  # greedy | beam | sample
    num_beams: int = 3  # beam only
    length_penalty: float = 1.0  # beam only: the sum of log-probs is divided by length**penalty; > 1 favours longer captions
    temperature: float = 1.0  # sample only
    top_k: int = 0  # sample only; 0 = off
    top_p: float = 1.0  # sample only; 1 = off
    max_new_tokens: int = 30
    min_new_tokens: int = 0  # end-of-text is suppressed before this many tokens; 0 = off
    seed: int | None = None  # sample only: a seed makes sampling repeatable; None draws from torch's global generator
    engine: str = "cached"  # cached: our KV-cache loop | hf: transformers' generate
    kv_cache: str = "preallocated"  # cached engine: preallocated (written in place) | dynamic (transformers' DynamicCache)

    def __post_init__(self):
        if self.strategy not in ("greedy", "beam", "sample"):
            raise ValueError(f"decoding strategy {self.strategy!r} is not one of greedy, beam, sample")
        if self.engine not in ("cached", "hf"):
            raise ValueError(f"decoding engine {self.engine!r} is not one of cached, hf")
        if self.kv_cache not in ("preallocated", "dynamic"):
            raise ValueError(f"decoding kv_cache {self.kv_cache!r} is not one of preallocated, dynamic")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, got {self.max_new_tokens}, {self.min_new_tokens}")
        if self.num_beams < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need num_beams >= 1, temperature > 0, 0 < top_p <= 1 and top_k >= 0")

    def generate_kwargs(self) -> dict:
        """The same decoding as keyword arguments of transformers' `generate`."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens, "use_cache": True}
        if self.strategy == "greedy":
            return {**kwargs, "do_sample": False, "num_beams": 1}
        if self.strategy == "beam":
            return {**kwargs, "do_sample": False, "num_beams": self.num_beams, "length_penalty": self.length_penalty, "early_stopping": True}
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in buffers sized for the whole caption, written in place.

    DynamicLayer concatenates at every step and beam search then index-selects: two fresh copies of
    the whole cache per step, each a large allocation (page faults on CPU). Here a step writes one
    position, and reordering beams gathers into a second buffer that is swapped in: no allocation
    after the first step. `keys` / `values` are views of the filled part, so GPT-2's attention and
    the mask sizes see exactly what DynamicLayer would give them."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def _view(self) -> None:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]  # (N, H, T, d)

    def _allocate(self, like: torch.Tensor, rows: int) -> None:
        n, h, _, d = like.shape
        shape = (rows, h, self.capacity, d)
        self._k, self._v = like.new_empty(shape), like.new_empty(shape)
        self._spare_k, self._spare_v = like.new_empty(shape), like.new_empty(shape)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
            self._allocate(key_states, key_states.shape[0])
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions, {end} were asked for")
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            k, v = self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0)
            self._allocate(k, k.shape[0])
            self._k[:, :, : self.length], self._v[:, :, : self.length] = k, v
            self._view()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length:
            torch.index_select(self._k, 0, beam_idx, out=self._spare_k)
            torch.index_select(self._v, 0, beam_idx, out=self._spare_v)
            self._k, self._spare_k, self._v, self._spare_v = self._spare_k, self._k, self._spare_v, self._v
            self._view()


def preallocated_cache(capacity: int) -> DynamicCache:
    """A DynamicCache whose layers are PreallocatedLayer(capacity)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = lambda: PreallocatedLayer(capacity)
    return cache


def _prefill(decoder, prefix: torch.Tensor, copies: int = 1, capacity: int = 0) -> tuple[torch.Tensor, DynamicCache]:
    """Run the prefix once; (next-token logits (B*copies, V), cache with each image's rows repeated).
    `capacity` > 0: a preallocated cache of that many positions (prefix + new tokens)."""
    cache = preallocated_cache(capacity) if capacity else DynamicCache()
    out = decoder(inputs_embeds=prefix, cache=cache, use_cache=True, logits_to_keep=1)  # lm_head on the last position only
    logits = out.logits[:, -1].float()  # (B, V)
    if copies > 1:  # beams share the prefix: compute it once, then copy its keys and values
        cache.batch_repeat_interleave(copies)
        logits = logits.repeat_interleave(copies, dim=0)  # (B*copies, V)
    return logits, cache


def _capacity(prefix: torch.Tensor, decoding: Decoding) -> int:
    """Positions a preallocated cache needs (0: use a DynamicCache)."""
    return prefix.shape[1] + decoding.max_new_tokens if decoding.kv_cache == "preallocated" else 0


def _step(decoder, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Feed one token per row (N,); returns the next logits (N, V). Positions come from the cache length."""
    return decoder(input_ids=tokens[:, None], cache=cache, use_cache=True).logits[:, -1].float()


def _log_probs(logits: torch.Tensor, step: int, eos: int, decoding: Decoding) -> torch.Tensor:
    log_probs = F.log_softmax(logits, dim=-1)
    if step < decoding.min_new_tokens:  # after the softmax, as transformers' MinNewTokensLengthLogitsProcessor does
        log_probs[:, eos] = -float("inf")
    return log_probs


def _filter(logits: torch.Tensor, decoding: Decoding) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of (N, V) logits."""
    logits = logits / decoding.temperature
    if decoding.top_k:
        kth = logits.topk(min(decoding.top_k, logits.shape[-1])).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if decoding.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > decoding.top_p  # mass before a token already exceeds p; the top token stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return logits


def _greedy_or_sample(decoder, prefix: torch.Tensor, eos: int, decoding: Decoding) -> torch.Tensor:
    """(B, T) tokens, end-of-text padded, for greedy (argmax) or sampled decoding."""
    b, steps = prefix.shape[0], decoding.max_new_tokens
    generator = None
    if decoding.strategy == "sample" and decoding.seed is not None:
        generator = torch.Generator(device=prefix.device).manual_seed(decoding.seed)
    logits, cache = _prefill(decoder, prefix, capacity=_capacity(prefix, decoding))
    tokens = torch.full((b, steps), eos, dtype=torch.long, device=prefix.device)
    done = torch.zeros(b, dtype=torch.bool, device=prefix.device)
    for t in range(steps):
        log_probs = _log_probs(logits, t, eos, decoding)
        if decoding.strategy == "greedy":
            next_tokens = log_probs.argmax(dim=-1)
        else:
            probs = _filter(log_probs, decoding).softmax(dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        next_tokens = next_tokens.masked_fill(done, eos)  # finished captions only pad
        tokens[:, t] = next_tokens
        done |= next_tokens == eos
        if t == steps - 1 or bool(done.all()):
            break
        logits = _step(decoder, next_tokens, cache)
    return tokens


def _beam(decoder, prefix: torch.Tensor, eos: int, decoding: Decoding) -> torch.Tensor:
    """(B, T) best beam per image. The same search as transformers' beam search with
    `early_stopping=True`: 2K candidates per step; a candidate among the top K that ends (end-of-text
    or the length limit) joins the finished set with score sum(log p) / length**length_penalty; an
    image stops when K hypotheses have finished."""
    b, k, steps, device = prefix.shape[0], decoding.num_beams, decoding.max_new_tokens, prefix.device
    rows = torch.arange(b, device=device)[:, None]  # (B, 1) for gathering per image
    in_top_k = torch.arange(2 * k, device=device) < k  # only the top K candidates may finish
    logits, cache = _prefill(decoder, prefix, copies=k, capacity=_capacity(prefix, decoding))  # (B*K, V)
    vocab = logits.shape[-1]
    live_tokens = torch.full((b, k, steps), eos, dtype=torch.long, device=device)
    live_scores = torch.full((b, k), NEG, device=device)
    live_scores[:, 0] = 0.0  # all beams start equal: let only the first one expand at step 0
    done_tokens = live_tokens.clone()
    done_scores = torch.full((b, k), NEG, device=device)
    done_flags = torch.zeros((b, k), dtype=torch.bool, device=device)
    for t in range(steps):
        log_probs = _log_probs(logits, t, eos, decoding).view(b, k, vocab) + live_scores[:, :, None]
        top_scores, top = log_probs.view(b, k * vocab).topk(2 * k)  # (B, 2K), best first
        source, token = top // vocab, top % vocab
        candidates = live_tokens[rows, source]  # (B, 2K, T)
        candidates[:, :, t] = token
        ends = (token == eos) | (t == steps - 1)  # (B, 2K)

        # finished hypotheses: length-normalised, never added to an image that already has K
        finishing = ends & in_top_k
        full = done_flags.all(dim=1, keepdim=True)  # (B, 1)
        finish_scores = torch.where(finishing & ~full, top_scores / (t + 1) ** decoding.length_penalty, NEG)
        merged = torch.cat([done_scores, finish_scores], dim=1).topk(k).indices  # (B, K)
        done_scores = torch.cat([done_scores, finish_scores], dim=1)[rows, merged]
        done_tokens = torch.cat([done_tokens, candidates], dim=1)[rows, merged]
        done_flags = torch.cat([done_flags, finishing], dim=1)[rows, merged]

        # live beams: the best K candidates that did not end
        live_scores, keep = (top_scores + ends.float() * NEG).topk(k)  # (B, K)
        live_tokens = candidates[rows, keep]
        if t == steps - 1 or bool(done_flags.all()):
            break
        cache.reorder_cache((source[rows, keep] + rows * k).view(-1))  # each beam continues its parent's keys/values
        logits = _step(decoder, live_tokens[:, :, t].reshape(-1), cache)
    return done_tokens[:, 0]  # finished sets are kept sorted: column 0 is the best


def _hf(decoder, prefix: torch.Tensor, eos: int, decoding: Decoding) -> torch.Tensor:
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    if decoding.strategy == "sample" and decoding.seed is not None:
        torch.manual_seed(decoding.seed)
    # with inputs_embeds only, generate returns just the continuation: (B, new tokens)
    return decoder.generate(inputs_embeds=prefix, attention_mask=mask, eos_token_id=eos, pad_token_id=eos, **decoding.generate_kwargs())


@torch.inference_mode()
def generate_ids(decoder, tokenizer, prefix: torch.Tensor, decoding: Decoding) -> list[list[int]]:
    """Token ids (end-of-text removed) for each prefix in the batch; prefix is (B, P, D)."""
    if prefix.dim() != 3:
        raise ValueError(f"prefix must be (batch, prefix length, embedding), got shape {tuple(prefix.shape)}")
    eos = tokenizer.eos_token_id
    if decoding.engine == "hf":
        out = _hf(decoder, prefix, eos, decoding)
    elif decoding.strategy == "beam":
        out = _beam(decoder, prefix, eos, decoding)
    else:
        out = _greedy_or_sample(decoder, prefix, eos, decoding)
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
