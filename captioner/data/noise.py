"""Noise injection on CLIP features (CapDec, and the paper's noise rate). Training batches only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_noise(
    features: torch.Tensor,
    variance: float,
    rate: float = 1.0,
    normalize: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A noisy copy of `features` (..., E); the input is never modified.

    CapDec: L2-normalise each vector, add N(0, variance) to every dimension (std = sqrt(variance);
    CapDec's 0.016 is std 0.126 against a unit vector), renormalise. `normalize=False` adds the same
    noise to the raw features and leaves their norm alone.
    `rate` (the paper's "noise rate") is the share of dimensions that receive noise: 1.0 is CapDec,
    0.1 perturbs a random 10 % of each vector's dimensions. `variance=0` or `rate=0` turns it off.
    """
    if variance < 0 or not 0 <= rate <= 1:
        raise ValueError(f"noise variance {variance} must be >= 0 and rate {rate} a share in [0, 1] (data.noise)")
    x = F.normalize(features, dim=-1) if normalize else features
    if variance == 0 or rate == 0:
        return x.clone()
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * variance**0.5
    if rate < 1:
        noise = noise * (torch.rand(x.shape, generator=generator, device=x.device) < rate)
    x = x + noise
    return F.normalize(x, dim=-1) if normalize else x
