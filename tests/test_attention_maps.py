"""The attention mapper's maps: per prefix slot, where it looks among the image patches."""

from __future__ import annotations

import pytest
import torch

from captioner.models.mapper import AttentionMapper, attention_grid


@pytest.fixture
def mapper():
    torch.manual_seed(0)
    return AttentionMapper(token_dim=32, embed_dim=48, prefix_length=5, num_tokens=16, num_layers=2, num_heads=4).eval()


def test_maps_are_the_last_layers_head_averaged_cross_attention(mapper):
    tokens = torch.randn(3, 16, 32)
    seen = {}
    last = mapper.layers[-1].cross
    last.register_forward_hook(lambda m, args, kwargs, out: seen.update(query=args[0], key=args[1]), with_kwargs=True)
    prefix, maps = mapper(tokens, return_attention=True)
    assert torch.allclose(prefix, mapper(tokens), atol=1e-5)  # asking for maps changes nothing else (other kernel)
    assert maps.shape == (3, 5, 16) and (maps >= 0).all()
    assert torch.allclose(maps.sum(-1), torch.ones(3, 5), atol=1e-5)
    # recompute softmax(QK^T / sqrt(d)) per head from the layer's own projections, then average the heads
    d, h = 48, 4
    wq, wk = last.in_proj_weight[:d], last.in_proj_weight[d : 2 * d]
    bq, bk = last.in_proj_bias[:d], last.in_proj_bias[d : 2 * d]
    q = (seen["query"] @ wq.T + bq).view(3, 5, h, d // h).transpose(1, 2)  # (B, H, P, d/H)
    k = (seen["key"] @ wk.T + bk).view(3, 16, h, d // h).transpose(1, 2)  # (B, H, N, d/H)
    expected = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1).mean(1)  # (B, P, N)
    assert torch.allclose(maps, expected, atol=1e-5)


def test_maps_follow_the_image_and_differ_between_slots(mapper):
    tokens = torch.randn(1, 16, 32)
    _, maps = mapper(tokens, return_attention=True)
    assert (maps[0, 0] - maps[0, 1]).abs().max() > 1e-4  # slots are different queries
    moved = tokens.roll(shifts=5, dims=1)  # same contents, other places
    _, maps_moved = mapper(moved, return_attention=True)
    assert not torch.allclose(maps, maps_moved, atol=1e-4)


def test_grid_layout_matches_the_patch_order():
    weights = torch.arange(2 * 3 * 49, dtype=torch.float).view(2, 3, 49)
    grid = attention_grid(weights)
    assert grid.shape == (2, 3, 7, 7) and grid[1, 2, 3, 4] == weights[1, 2, 3 * 7 + 4]
    with pytest.raises(ValueError, match="square grid"):
        attention_grid(torch.zeros(1, 2, 50))


def test_maps_from_a_module_batch(smoke_cfg):
    from hydra.utils import instantiate

    cfg = smoke_cfg("model/mapper=attention")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    module = instantiate(cfg.model).eval()
    pixels = torch.randn(2, 3, module.encoder.resolution, module.encoder.resolution)
    prefix, maps = module.mapper(module.features({"pixels": pixels}), return_attention=True)
    assert prefix.shape == (2, cfg.model.prefix_length, module.decoder.config.n_embd)
    g = module.encoder.resolution // cfg.pretrain.clip.arch.vision_patch_size  # the tiny ViT's g x g patches
    assert attention_grid(maps).shape == (2, cfg.model.prefix_length, g, g)
