"""Dynamic int8 quantisation for CPU inference: weights stored as int8, activations quantised on the fly.

`torch.ao.quantization.quantize_dynamic` only swaps `nn.Linear`, but GPT-2's attention and MLP
projections are transformers' `Conv1D` (y = x @ W + b with W stored (in, out)); left alone, almost
all of GPT-2's weights would stay fp32. We first turn every `Conv1D` into the equal `nn.Linear`
(W transposed), then quantise with per-channel weight scales, which keeps int8 captions closer to
fp32 than one scale per matrix. The tied `lm_head` gets its own fp16 copy (fbgemm's fp16 kernel), not
int8: the last projection decides which token wins, and int8 rounding flips near-ties between
tokens more often than fp16 does. The input embedding stays fp32 (a lookup, no matmul).
`bench/decode.py --ckpt CKPT --skip-speed` measures the caption agreement with fp32, `bench/decode.py`
the speed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def linear_from_conv1d(conv: Conv1D) -> nn.Linear:
    """The `nn.Linear` computing exactly what `conv` computes."""
    n_in, n_out = conv.weight.shape  # Conv1D keeps (in, out); nn.Linear wants (out, in)
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def swap_layers(model: nn.Module, swap) -> nn.Module:
    """Replace, in place, every submodule for which `swap(child)` returns a module (its children are
    not visited), and look inside the others; returns `model`."""
    for name, child in list(model.named_children()):
        replacement = swap(child)
        if replacement is not None:
            setattr(model, name, replacement)
        else:
            swap_layers(child, swap)
    return model


def replace_conv1d(model: nn.Module) -> nn.Module:
    """Swap every `Conv1D` in `model` (in place) for its `nn.Linear`; returns `model`."""
    return swap_layers(model, lambda child: linear_from_conv1d(child) if isinstance(child, Conv1D) else None)


def with_parts(module, **parts: nn.Module):
    """A shallow copy of a `CaptionModel` (or of a module wrapping one as `.model`) with some parts
    (`decoder=`, `mapper=`) replaced; the others (the CLIP encoder) and the tokenizer are shared."""
    inner = module._modules.get("model")
    if inner is not None:  # a LightningModule around the model core: copy both levels
        parts = {"model": with_parts(inner, **parts)}
    out = copy.copy(module)
    out._modules = {**module._modules, **parts}  # its own submodule table
    return out.eval()


FP16 = ("lm_head",)  # layers kept in fp16 rather than int8 (the output projection of every transformers causal LM)


def quantize(model: nn.Module, fp16: tuple[str, ...] = FP16) -> nn.Module:
    """An int8 copy of `model` (its `nn.Linear` and `Conv1D` layers) for CPU inference, the layers
    named in `fp16` in fp16; `model` is untouched."""
    from torch.ao.quantization import float16_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("dynamic int8 quantisation runs on CPU only: move the model with .cpu() first")
    model = replace_conv1d(copy.deepcopy(model).float().eval())
    spec = {name: float16_dynamic_qconfig if name in fp16 else per_channel_dynamic_qconfig
            for name, layer in model.named_modules() if type(layer) is nn.Linear}  # not subclasses: MultiheadAttention reads out_proj.weight
    return quantize_dynamic(model, spec)


def quantize_module(module):
    """A `CaptionModel` (or `CaptionModule`) copy whose decoder and mapper run in int8 (the CLIP encoder stays fp32)."""
    return with_parts(module, decoder=quantize(module.decoder), mapper=quantize(module.mapper))
