"""Low-rank adapters (LoRA, through `peft`) on a decoder whose own weights stay frozen.

`model.decoder_mode=lora` trains the mapper and, in each targeted projection of the decoder, a pair
of rank-r matrices whose product (scaled by alpha / r) is added to the frozen weight. Options
(`model.lora`): r (8), alpha (16), dropout (0.0), target_modules (peft's defaults for the family:
GPT-2's fused `c_attn`, the query and value projections of Llama, Qwen2, OPT, ...). `merge` folds the
adapters into the weights for export: the same logits from a plain decoder.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}


def default_targets(model_type: str) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS

    if model_type not in TARGETS:
        raise ValueError(f"no default LoRA target modules for model_type={model_type!r}: "
                         "name the decoder's linear layers in model.lora.target_modules")
    return list(TARGETS[model_type])


def add_adapters(decoder: nn.Module, options: Mapping | None = None, seed: int = 0) -> nn.Module:
    """Freeze `decoder` and inject trainable LoRA adapters into it, in place (adapter weights drawn
    from `seed` without moving the run's random stream); returns `decoder`."""
    from peft import LoraConfig, inject_adapter_in_model

    unknown = sorted(set(options or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown LoRA option(s) {unknown} (model.lora): choose from {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **(options or {})}
    model_type = decoder.config.model_type
    config = LoraConfig(r=int(o["r"]), lora_alpha=o["alpha"], lora_dropout=o["dropout"], bias="none",
                        target_modules=list(o["target_modules"] or default_targets(model_type)),
                        fan_in_fan_out=model_type == "gpt2")  # GPT-2's Conv1D stores weights (in, out)
    decoder.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, decoder)
    for name, param in decoder.named_parameters():
        param.requires_grad = "lora_" in name
    return decoder


def merge(decoder: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the base layer back in its place (in place);
    the decoder is then trainable as a whole again."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(decoder.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(decoder.get_submodule(parent_name) if parent_name else decoder, child, module.get_base_layer())
    decoder.requires_grad_(True)
    return decoder
