"""The captioning model as one plain `nn.Module`: image encoder -> mapper -> causal language model.

    model = CaptionModel(encoder="ViT-B/32", decoder="gpt2", tokenizer="gpt2", mapper={"name": "mlp"})
    out = model(batch)                       # batch: pixels or stored features + input_ids, attention_mask
    out.loss.backward()
    model.caption(batch, Decoding(strategy="beam", num_beams=3))   # -> list[str]

It knows nothing of training loops: the cross-entropy, SCST and retrieval LightningModules wrap it,
`captioner.api.Captioner` serves it. What the decoder reads is assembled in one place (`inputs`):
the mapper's prefix, then an optional context prompt (retrieval), then the caption tokens; only the
caption is a target. The prefix stands where a beginning-of-sequence token would (see decoder.py).

Frozen parts follow one rule (`frozen_parts`): no gradient, never in the optimizer, and eval mode
whatever `train()` asks. The encoder is always frozen; the decoder is frozen (`decoder_mode="frozen"`),
fully trained (`"finetune"`), or frozen with trainable low-rank adapters (`"lora"`, captioner/models/lora.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from captioner.generate import Decoding, generate
from captioner.models import lora as lora_adapters
from captioner.models.decoder import hidden_size, load_decoder, load_tokenizer, max_positions
from captioner.models.registry import build_mapper
from captioner.models.towers import build_encoder

DECODER_MODES = ("finetune", "frozen", "lora")
log = logging.getLogger(__name__)


class CaptionModel(nn.Module):
    def __init__(
        self,
        encoder: str | Mapping = "ViT-B/32",  # a name/path loads CLIP; a mapping builds it randomly
        decoder: str | Mapping = "gpt2",  # a hub name or save_pretrained directory; a mapping builds one (decoder.py)
        tokenizer: str = "gpt2",  # a save_pretrained tokenizer directory, GPT-2's vocab.json + merges.txt, or a hub name
        mapper: Mapping | None = None,  # {name: a registered mapper (models/registry.py), ...its options}
        prefix_length: int = 10,  # slots of a mapper with learned slots; token-for-token bridges emit their own count
        decoder_mode: str = "finetune",  # finetune | frozen | lora
        lora: Mapping | None = None,  # lora mode: {r, alpha, dropout, target_modules}; per-family defaults in lora.py
        normalize_features: bool = True,  # L2-normalise CLIP features before the mapper (CapDec)
        encoder_precision: str = "fp32",
        seed: int = 0,  # the weights of any part built at random
    ):
        super().__init__()
        if decoder_mode not in DECODER_MODES:
            raise ValueError(f"decoder_mode={decoder_mode!r} is not one of {DECODER_MODES} (model.decoder_mode)")
        self.decoder_mode, self.normalize_features = decoder_mode, normalize_features
        self.encoder = build_encoder(encoder, precision=encoder_precision)  # random weights: the spec's seed, as in the store
        self.tokenizer = load_tokenizer(tokenizer)
        self.decoder = load_decoder(decoder, self.tokenizer, seed=seed)
        mapper = dict(mapper or {"name": "attention"})
        self.mapper = build_mapper(
            mapper.pop("name"),
            feature_dim=self.encoder.embed_dim,
            token_dim=self.encoder.token_dim,
            num_tokens=self.encoder.num_tokens,
            embed_dim=hidden_size(self.decoder),
            prefix_length=prefix_length,
            options=mapper,
        )
        self.prefix_length = self.mapper.prefix_length  # what the decoder reads before the caption
        positions = max_positions(self.decoder)
        if positions is not None and self.prefix_length >= positions:
            raise ValueError(f"the {self.mapper.name} mapper's prefix of {self.prefix_length} embeddings leaves no room for a caption "
                             f"in the decoder's {positions} positions: choose a shorter prefix or a decoder with more positions")
        if self.prefix_length != prefix_length:
            log.info("the %s mapper emits %d prefix embeddings (one per patch token or block); prefix_length=%d "
                     "is read only by mappers with learned slots", self.mapper.name, self.prefix_length, prefix_length)
        self.encoder.requires_grad_(False)
        if decoder_mode == "frozen":
            self.decoder.requires_grad_(False)
        elif decoder_mode == "lora":
            lora_adapters.add_adapters(self.decoder, lora, seed=seed)  # base weights frozen, adapters trainable
        self.train()  # from_pretrained returns eval mode; Lightning keeps each module's mode

    # one rule for frozen parts: they stay in eval mode (no dropout) whatever the caller switches
    def frozen_parts(self) -> list[nn.Module]:
        return [self.encoder, *([self.decoder] if self.decoder_mode == "frozen" else [])]

    def train(self, mode: bool = True) -> "CaptionModel":
        super().train(mode)
        for part in self.frozen_parts():
            part.eval()
        return self

    def trainable_parameters(self) -> dict[str, tuple[int, int]]:
        """(trainable, total) parameter counts of encoder, mapper, decoder and "all"."""
        counts = {}
        for name in ("encoder", "mapper", "decoder"):
            params = list(getattr(self, name).parameters())
            counts[name] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        counts["all"] = tuple(sum(c[i] for c in counts.values()) for i in (0, 1))
        return counts

    @property
    def max_new_tokens(self) -> int:
        """How many tokens fit after the prefix in the decoder's positions."""
        limit = max_positions(self.decoder)
        return 10**6 if limit is None else limit - self.prefix_length

    @property
    def embed_tokens(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mapper's input from a batch with `pixels` or precomputed CLIP features."""
        key = self.mapper.input_key
        x = batch[key] if key in batch else self.encoder(batch["pixels"])[key]
        return F.normalize(x, dim=-1) if self.normalize_features else x

    def prefix(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.mapper(self.features(batch))  # (B, P, D)

    def inputs(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prompts: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs_embeds (B, P+L, D), attention mask (B, P+L), labels (B, P+L)) for prefix (B, P, D) +
        prompt + caption tokens (B, S) whose padding `attention_mask` marks. Only caption tokens are labels
        (-100 elsewhere); the decoder shifts labels itself."""
        b, p, device = prefix.shape[0], prefix.shape[1], prefix.device
        ones = torch.ones((b, p), dtype=attention_mask.dtype, device=device)
        if prompts is None:
            ids, mask, labels = input_ids, attention_mask, input_ids.masked_fill(attention_mask == 0, -100)
        else:  # each row: its prompt (context), then its caption, then padding
            rows = [list(q) + input_ids[i][attention_mask[i].bool()].tolist() for i, q in enumerate(prompts)]
            length = max(len(r) for r in rows)
            ids = torch.full((b, length), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
            mask = torch.zeros((b, length), dtype=attention_mask.dtype, device=device)
            labels = torch.full((b, length), -100, dtype=torch.long, device=device)
            for i, (q, r) in enumerate(zip(prompts, rows)):
                ids[i, : len(r)] = torch.tensor(r, device=device)
                mask[i, : len(r)] = 1
                labels[i, len(q) : len(r)] = ids[i, len(q) : len(r)]
        embeds = torch.cat([prefix, self.embed_tokens(ids).to(prefix.dtype)], dim=1)
        ignore = torch.full((b, p), -100, dtype=torch.long, device=device)  # the prefix is context, never a target
        return embeds, torch.cat([ones, mask], dim=1), torch.cat([ignore, labels], dim=1)

    def forward(self, batch: Mapping[str, torch.Tensor], prompts: Sequence[Sequence[int]] | None = None):
        """The decoder's output (loss, logits) over prefix + prompt + caption; `batch` holds the image
        (pixels or stored features), `input_ids` and `attention_mask`."""
        embeds, mask, labels = self.inputs(self.prefix(batch), batch["input_ids"], batch["attention_mask"], prompts)
        return self.decoder(inputs_embeds=embeds, attention_mask=mask, labels=labels)

    def token_log_probs(self, prefix: torch.Tensor, tokens: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L) log p of each token given prefix (N, P, D) and the tokens before it, and the (N, L) mask
        of real tokens (rows of `tokens` differ in length)."""
        n, p, device = len(tokens), prefix.shape[1], prefix.device
        length = max(1, max(len(t) for t in tokens))
        ids = torch.full((n, length), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, length), dtype=torch.long, device=device)
        for i, t in enumerate(tokens):
            ids[i, : len(t)] = torch.tensor(list(t), dtype=torch.long)
            mask[i, : len(t)] = 1
        embeds, attention, _ = self.inputs(prefix, ids, mask)
        logits = self.decoder(inputs_embeds=embeds, attention_mask=attention).logits[:, p - 1 : -1]  # position t predicts token t
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1)
        return logp * mask, mask

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, decoding: Decoding | None = None,
                 prompts: Sequence[Sequence[int]] | None = None) -> list[str]:
        """Captions for prefixes (B, P, D), each optionally followed by a prompt's tokens. The decode loop
        takes no padding mask, so rows are decoded in groups whose prompts have the same length."""
        prefix = prefix.to(self.decoder.dtype)  # a bf16 decoder (Captioner precision=bf16) takes bf16
        if prompts is None:
            return generate(self.decoder, self.tokenizer, prefix, decoding)
        captions = [""] * len(prompts)
        for length in sorted({len(q) for q in prompts}):
            rows = [i for i, q in enumerate(prompts) if len(q) == length]
            ids = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=prefix.device).view(len(rows), length)
            context = torch.cat([prefix[rows], self.embed_tokens(ids).to(prefix.dtype)], dim=1)  # (G, P+length, D)
            for i, text in zip(rows, generate(self.decoder, self.tokenizer, context, decoding)):
                captions[i] = text
        return captions

    @torch.no_grad()
    def caption(self, batch: Mapping[str, torch.Tensor], decoding: Decoding | None = None,
                prompts: Sequence[Sequence[int]] | None = None) -> list[str]:
        """Captions for a batch of images (pixels or stored features)."""
        return self.generate(self.prefix(batch), decoding, prompts)

    def merge_adapters(self) -> "CaptionModel":
        """LoRA mode: fold the adapters into the decoder's weights (in place); the model is then a
        fine-tuned one (`decoder_mode="finetune"`) computing the same logits."""
        if self.decoder_mode == "lora":
            lora_adapters.merge(self.decoder)
            self.decoder_mode = "finetune"
        return self
