"""fp32 CPU inference with GPT-2's and the mapper's weights reordered once into oneDNN's layout.

At batch 1 (and a handful of beams) a GPT-2 step is a matrix-vector product per weight matrix, so it
is bound by reading the weights. `Conv1D`'s `addmm` and `nn.Linear` run a plain sgemm on the weight
as stored; oneDNN's linear with a weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, the same prepacking torch.compile's CPU freezing pass
applies) streams it faster. The values stay fp32: only the layout and the order of summation
change, so captions equal the unpacked model's (tests/test_prepack.py; bench/decode.py checks the
tokens against HF `generate` and times both).

A prepacked module is for inference only: its packed layers hold no parameters (no gradients, no
state dict entries) and run on the CPU. GPT-2's tied `lm_head` gets its own packed copy; the input
embedding stays a lookup.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

ROWS_HINT = 8  # the batch oneDNN tunes the layout for: a few beams or a micro-batch of requests


def available() -> bool:
    """Whether this torch has oneDNN (mkldnn) for CPU linear layers."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """y = x W^T + b with W (out, in) held in oneDNN's blocked layout; fp32, CPU, inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int = ROWS_HINT):
        super().__init__()
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ValueError(f"prepacking is for fp32 weights on the CPU, got {weight.dtype} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)  # an opaque mkldnn tensor
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packed(layer: nn.Module) -> PackedLinear:
    """The PackedLinear computing what `layer` (a `Conv1D`, W stored (in, out), or an `nn.Linear`) computes."""
    weight = layer.weight.t() if isinstance(layer, Conv1D) else layer.weight
    return PackedLinear(weight, layer.bias)


def prepack_(model: nn.Module) -> nn.Module:
    """Swap `model`'s `Conv1D` and plain `nn.Linear` layers for PackedLinear, in place; returns `model`.
    Subclasses of nn.Linear are left alone (MultiheadAttention reads its `out_proj.weight` directly)."""
    for name, child in list(model.named_children()):
        if isinstance(child, Conv1D) or type(child) is nn.Linear:
            setattr(model, name, packed(child))
        else:
            prepack_(child)
    return model


def prepack_module(module):
    """A `CaptionModule` copy whose decoder and mapper run prepacked (the CLIP encoder is shared, as is)."""
    if not available():
        raise RuntimeError("this torch build has no oneDNN (mkldnn): run without prepacking")
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in module.decoder.parameters()):
        raise ValueError("prepacking is for an fp32 model on the CPU: move it with .cpu().float() or drop prepacking")
    out = copy.copy(module)  # shallow: shares the encoder and tokenizer, gets its own submodule table
    out._modules = dict(module._modules)
    out._modules["decoder"] = prepack_(copy.deepcopy(module.decoder).eval())
    out._modules["mapper"] = prepack_(copy.deepcopy(module.mapper).eval())
    return out.eval()
