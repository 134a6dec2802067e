"""bench/roofline.py's counter: the FLOPs and bytes every bench's "% of peak" column divides by."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ is scripts, not a package

import roofline  # noqa: E402

from captioner import prepack  # noqa: E402

FP32 = 4


def counted(fn, mode) -> roofline.Work:
    with mode():
        return roofline.measure(fn)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_linear_conv_and_attention_are_counted_in_either_mode(mode):
    """Under inference_mode aten.linear, conv2d and scaled_dot_product_attention reach the counter
    before they decompose; their kernels' FLOPs must count all the same (the image encoder's used not to)."""
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 32), torch.randn(5, 64)
    assert counted(lambda: linear(x), mode).flops["fp32"] == 2 * 5 * 64 * 32
    work = counted(lambda: linear(x), mode)
    assert work.bytes == FP32 * (5 * 64 + 32 * 64 + 32 + 5 * 32)  # input, weight, bias, output: each once

    conv, image = nn.Conv2d(3, 8, 4, stride=4, bias=False), torch.randn(2, 3, 16, 16)
    assert counted(lambda: conv(image), mode).flops["fp32"] == 2 * (2 * 8 * 4 * 4) * (3 * 4 * 4)  # per output: C_in*k*k MACs

    q, k, v = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    assert counted(lambda: F.scaled_dot_product_attention(q, k, v), mode).flops["fp32"] == 2 * 2 * 7 * 9 * (16 + 16)


def test_a_broadcast_operand_is_read_once():
    """An expanded (stride-0) tensor moves its storage's bytes, not one copy per batch row."""
    queries, keys = torch.randn(1, 3, 8), torch.randn(4, 8, 5)
    work = roofline.measure(lambda: torch.bmm(queries.expand(4, 3, 8), keys))
    assert work.flops["fp32"] == 2 * 4 * 3 * 8 * 5
    assert work.bytes == FP32 * (3 * 8 + 4 * 8 * 5 + 4 * 3 * 5)


def test_an_embedding_lookup_reads_its_rows_not_the_table():
    table, ids = nn.Embedding(1000, 16), torch.tensor([[3, 7]])
    work = roofline.measure(lambda: table(ids))
    assert work.bytes == ids.numel() * 8 + 2 * FP32 * 2 * 16  # the ids, the rows read and written


@pytest.mark.skipif(not prepack.available(), reason="this torch has no oneDNN")
def test_a_prepacked_linear_counts_as_the_linear_it_replaces():
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 32), torch.randn(5, 64)
    layer = prepack.packed(linear)
    plain, packed = counted(lambda: linear(x), torch.inference_mode), counted(lambda: layer(x), torch.inference_mode)
    assert dict(packed.flops) == dict(plain.flops)
    assert packed.bytes == plain.bytes


def test_floor_and_share_name_the_binding_limit():
    peak = roofline.Peak("cpu", 2, {"fp32": 100.0}, read_gbs=10.0)
    compute_bound = roofline.Work(bytes=1e9)
    compute_bound.flops["fp32"] = 20e9  # 0.2 s of compute vs 0.1 s of memory
    assert compute_bound.floor(peak) == pytest.approx((0.2, "compute"))
    share, bound = compute_bound.share(0.4, peak)
    assert (share, bound) == (pytest.approx(0.5), "compute")
    memory_bound = roofline.Work(bytes=5e9)
    memory_bound.flops["fp32"] = 20e9
    assert memory_bound.floor(peak) == pytest.approx((0.5, "memory"))
