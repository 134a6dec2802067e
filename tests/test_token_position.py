"""The attention mapper's token position table: learned from zero, fixed 2-D sin-cos, or learned from it."""

from __future__ import annotations

import pytest
import torch

from captioner.models.mapper import AttentionMapper, sincos_2d


def test_sincos_table_encodes_row_and_column():
    table = sincos_2d(16, 32)  # a 4 x 4 grid, flattened row by row
    assert table.shape == (16, 32)
    rows, cols = table[:, :16], table[:, 16:]
    for n in range(16):
        for m in range(16):
            same_row, same_col = n // 4 == m // 4, n % 4 == m % 4
            assert torch.equal(rows[n], rows[m]) == same_row
            assert torch.equal(cols[n], cols[m]) == same_col
    assert torch.allclose(table.norm(dim=1), torch.ones(16))  # unit rows, the scale of normalised tokens
    assert torch.allclose(table[0] * 4, torch.tensor([0.0, 1.0]).repeat_interleave(8).repeat(2))  # cell (0, 0): sin 0, cos 0
    with pytest.raises(ValueError, match="square grid"):
        sincos_2d(12, 32)


def _mapper(position: str) -> AttentionMapper:
    torch.manual_seed(0)
    return AttentionMapper(token_dim=24, embed_dim=32, prefix_length=3, num_tokens=16, num_layers=1, num_heads=4, position=position)


def test_each_setting_starts_and_trains_its_table():
    learned, fixed, warm = _mapper("learned"), _mapper("sincos2d"), _mapper("learned_sincos2d")
    assert torch.count_nonzero(learned.token_position) == 0 and learned.token_position.requires_grad
    assert torch.equal(fixed.token_position, sincos_2d(16, 32)) and not fixed.token_position.requires_grad
    assert torch.equal(warm.token_position, sincos_2d(16, 32)) and warm.token_position.requires_grad
    tokens = torch.randn(2, 16, 24)
    for mapper in (learned, fixed, warm):
        mapper(tokens).pow(2).sum().backward()
    assert fixed.token_position.grad is None and learned.token_position.grad.abs().sum() > 0


def test_the_table_tells_the_mapper_where_a_token_came_from():
    """Two images with the same tokens in other places: only a position table tells them apart."""
    tokens = torch.randn(1, 16, 24)
    moved = tokens[:, torch.randperm(16, generator=torch.Generator().manual_seed(1))]
    learned, fixed = _mapper("learned"), _mapper("sincos2d")
    assert torch.allclose(learned(tokens), learned(moved), atol=1e-5)  # zero table: a bag of tokens
    assert not torch.allclose(fixed(tokens), fixed(moved), atol=1e-3)


def test_any_checkpoint_loads_into_any_setting():
    trained = _mapper("learned")
    with torch.no_grad():
        trained.token_position.normal_()
    tokens = torch.randn(2, 16, 24)
    for position in ("learned", "sincos2d", "learned_sincos2d"):
        other = _mapper(position)
        other.load_state_dict(trained.state_dict())
        assert torch.equal(other(tokens), trained(tokens))


def test_an_unknown_setting_is_one_clear_error():
    with pytest.raises(ValueError, match=r"model\.mapper\.position"):
        _mapper("rope")
