"""ONNX graphs of a trained model: image encoder, mapper, and the decoder with its KV cache.

    python -m captioner.export ckpt=last.ckpt onnx=true   # writes DIR/onnx/ beside the safetensors

DIR/onnx/ receives four graphs (torch.onnx, opset 17) and `graphs.json`, which names what they take:
    encoder.onnx         pixels (B, 3, R, R) -> features: the mapper's input, L2-normalised when the model was
    mapper.onnx          features -> prefix (B, P, D)
    decoder_prefill.onnx prefix (B, P, D) -> next-token logits (B, V), keys and values (layers, B, H, P, d)
    decoder_step.onnx    one token per row (N, 1), its positions (N, 1), past keys and values
                         (layers, N, H, T, d) -> next-token logits (N, V), the new position's keys and values
                         (layers, N, H, 1, d)
The decoder is two graphs because a prefill reads embeddings (the prefix) and a step reads token ids;
each carries its own copy of the decoder's weights. What does not export: the attention mapper's maps
(`describe(attention=True)`), retrieval models (their datastore search is PyTorch), int8/bf16 variants
(the graphs are fp32) and the `hf` decoding engine (transformers' generate).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

OPSET = 17
FOLDER, MANIFEST = "onnx", "graphs.json"
GRAPHS = ("encoder", "mapper", "decoder_prefill", "decoder_step")


class EncoderGraph(nn.Module):
    """pixels -> the mapper's input, as `CaptionModule.features` computes it from pixels."""

    def __init__(self, module):
        super().__init__()
        self.encoder, self.key, self.normalize = module.encoder, module.mapper.input_key, module.hparams.normalize_features

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.encoder(pixels)[self.key]  # (B, E) or (B, N, W)
        return F.normalize(x, dim=-1) if self.normalize else x


def _stack(cache: DynamicCache, last: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache's keys and values as two (layers, N, H, T, d) tensors (only the `last` positions when given)."""
    keys = [layer.keys if last is None else layer.keys[:, :, -last:] for layer in cache.layers]
    values = [layer.values if last is None else layer.values[:, :, -last:] for layer in cache.layers]
    return torch.stack(keys), torch.stack(values)


class PrefillGraph(nn.Module):
    """prefix (B, P, D) -> (logits of the next token (B, V), keys, values (layers, B, H, P, d))."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, prefix: torch.Tensor):
        cache = DynamicCache()
        out = self.decoder(inputs_embeds=prefix, cache=cache, use_cache=True, logits_to_keep=1)
        return (out.logits[:, -1], *_stack(cache))


class StepGraph(nn.Module):
    """One token per row with its position and the past keys/values -> next logits and the new position's keys/values.

    Positions are an input, not read from the cache's length, so the traced graph holds no constant length."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor):
        cache = DynamicCache()
        for i in range(past_keys.shape[0]):
            cache.update(past_keys[i], past_values[i], i)
        out = self.decoder(input_ids=tokens, position_ids=positions, cache=cache, use_cache=True)
        return (out.logits[:, -1], *_stack(cache, last=1))


def _export(model: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated; it traces transformers' models as they are
            warnings.simplefilter("ignore")
            torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused inference kernel has no ONNX form
            torch.onnx.export(model, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def unsupported(module) -> str | None:
    """Why this model cannot be exported, or None."""
    source = getattr(module.encoder, "source", "clip")
    if source != "clip":  # onnx_runtime preprocesses as OpenAI's CLIP does
        return f"the ONNX engine preprocesses images as OpenAI's CLIP does, not as this {source} tower does: export without onnx"
    if hasattr(module, "describe_features"):
        return "a retrieval model's datastore search runs in PyTorch: its prompt cannot be an ONNX graph"
    if any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in module.modules()):
        return "int8 layers (captioner/quantize.py) do not export: export the fp32 model"
    return None


@torch.no_grad()
def export_onnx(module, out: str | Path) -> Path:
    """The four graphs of `module` (a CaptionModule, fp32, CPU) in `out`/onnx/; returns that folder."""
    reason = unsupported(module) or next((f"{name} is {p.dtype} on {p.device}: export an fp32 model on the CPU"
                                          for name, p in module.named_parameters() if p.dtype != torch.float32 or p.device.type != "cpu"), None)
    if reason:
        raise ValueError(f"cannot export to ONNX: {reason}")
    module.eval()
    folder = Path(out) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    resolution = module.encoder.resolution
    pixels = torch.randn(2, 3, resolution, resolution)
    encoder = EncoderGraph(module).eval()
    _export(encoder, (pixels,), folder / "encoder.onnx", ["pixels"], ["features"], {"pixels": {0: "batch"}, "features": {0: "batch"}})
    features = encoder(pixels)
    _export(module.mapper, (features,), folder / "mapper.onnx", ["features"], ["prefix"], {"features": {0: "batch"}, "prefix": {0: "batch"}})
    prefix = module.mapper(features)  # (2, P, D)
    decoder = module.decoder
    _export(PrefillGraph(decoder).eval(), (prefix,), folder / "decoder_prefill.onnx", ["prefix"], ["logits", "keys", "values"],
            {"prefix": {0: "rows"}, "logits": {0: "rows"}, "keys": {1: "rows"}, "values": {1: "rows"}})
    _, keys, values = PrefillGraph(decoder)(prefix)  # (layers, 2, H, P, d)
    p = prefix.shape[1]
    tokens, positions = torch.tensor([[1], [2]]), torch.tensor([[p], [p]])
    cache_axes = {1: "rows", 3: "length"}  # (layers, N, H, T, d): any rows, any past length
    _export(StepGraph(decoder).eval(), (tokens, positions, keys, values), folder / "decoder_step.onnx",
            ["tokens", "positions", "past_keys", "past_values"], ["logits", "keys", "values"],
            {"tokens": {0: "rows"}, "positions": {0: "rows"}, "past_keys": cache_axes, "past_values": cache_axes,
             "logits": {0: "rows"}, "keys": {1: "rows"}, "values": {1: "rows"}})
    manifest = {"opset": OPSET, "graphs": {name: f"{name}.onnx" for name in GRAPHS}, "resolution": resolution,
                "prefix_length": p, "embed_dim": prefix.shape[2], "layers": keys.shape[0],
                "max_positions": getattr(decoder.config, "n_positions", None) or decoder.config.max_position_embeddings,
                "eos_token_id": module.tokenizer.eos_token_id}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return folder
