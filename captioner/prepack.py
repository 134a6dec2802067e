"""fp32 CPU inference with GPT-2's and the mapper's weights reordered once into oneDNN's layout.

A GPT-2 step for a few beams or a small batch multiplies a few rows by each weight matrix, so it is
bound by reading the weights. On a quiet 2-core Intel CPU, 12 of GPT-2's (768, 3072) matrices: for
5 rows, `Conv1D`'s `addmm` on its (in, out) weight reads 7.1 GB/s, `nn.Linear` on (out, in) 12.3,
oneDNN's linear on a weight reordered once into its blocked layout 18.0 (the prepacking
torch.compile's CPU freezing pass applies: `torch.ops.mkldnn._reorder_linear_weight`); for one row
`addmm` is fastest (27.9 vs 20.0), so single rows keep the weight as stored. The values stay fp32: only the layout and the order of summation
change, so captions equal the unpacked model's (tests/test_prepack.py; bench/decode.py checks the
tokens against HF `generate` and times both).

A prepacked module is for inference only: its packed layers hold no parameters (no gradients, no
state dict entries) and run on the CPU. The packed copies come on top of the weights as stored
(which serve single rows): about 500 MB more for GPT-2 124M. GPT-2's tied `lm_head` is packed
too; the input embedding stays a lookup.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from captioner.quantize import swap_layers, with_parts

ROWS_HINT = 8  # the batch oneDNN tunes the layout for: a few beams or a micro-batch of requests


def available() -> bool:
    """Whether this torch has oneDNN (mkldnn) for CPU linear layers."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """y = x W^T + b, W (out, in) also held in oneDNN's blocked layout; fp32, CPU, inference only.

    Several rows (beams, a batch, a prefix) go through the packed copy. A single row stays on the
    weight as stored: there the plain kernel (a matrix-vector product) already streams it as fast as
    the packed one, or faster (bench/decode.py's greedy batch-1 row). `stored` is the original
    layer's weight, shared, not copied: `(in, out)` for a Conv1D (`stored_in_out=True`), else `(out, in)`."""

    def __init__(self, stored: torch.Tensor, bias: torch.Tensor | None, stored_in_out: bool = False, rows: int = ROWS_HINT):
        super().__init__()
        if stored.device.type != "cpu" or stored.dtype != torch.float32:
            raise ValueError(f"prepacking is for fp32 weights on the CPU, got {stored.dtype} on {stored.device}")
        stored = stored.detach()
        weight = stored.t() if stored_in_out else stored  # (out, in)
        self.out_features, self.in_features = weight.shape
        self.stored, self.stored_in_out, self.bias = stored, stored_in_out, None if bias is None else bias.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)  # an opaque mkldnn tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if x.numel() == self.in_features:  # one row
            if not self.stored_in_out:
                return F.linear(x, self.stored, self.bias)
            flat = x.reshape(1, -1)
            out = flat @ self.stored if self.bias is None else torch.addmm(self.bias, flat, self.stored)
            return out.view(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packed(layer: nn.Module) -> PackedLinear:
    """The PackedLinear computing what `layer` (a `Conv1D`, W stored (in, out), or an `nn.Linear`) computes."""
    return PackedLinear(layer.weight, layer.bias, stored_in_out=isinstance(layer, Conv1D))


def prepack_(model: nn.Module) -> nn.Module:
    """Swap `model`'s `Conv1D` and plain `nn.Linear` layers for PackedLinear, in place; returns `model`.
    Subclasses of nn.Linear are left alone (MultiheadAttention reads its `out_proj.weight` directly)."""
    return swap_layers(model, lambda child: packed(child) if isinstance(child, Conv1D) or type(child) is nn.Linear else None)


def prepack_module(module):
    """A `CaptionModel` (or `CaptionModule`) copy whose decoder and mapper run prepacked (the CLIP encoder is shared, as is)."""
    if not available():
        raise RuntimeError("this torch build has no oneDNN (mkldnn): run without prepacking")
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in module.decoder.parameters()):
        raise ValueError("prepacking is for an fp32 model on the CPU: move it with .cpu().float() or drop prepacking")
    return with_parts(module, decoder=prepack_(copy.deepcopy(module.decoder)), mapper=prepack_(copy.deepcopy(module.mapper)))
