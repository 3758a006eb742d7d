"""FLOP counting with attention counted from shapes, against hand-computed figures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from livetalk_cli.flops import FlopCount


@pytest.mark.parametrize("masked", [False, True])
def test_flop_count_counts_attention_once_and_linears_as_torch_does(masked):
    b, h, lq, lk, d = 2, 3, 5, 7, 8
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
    mask = torch.rand(1, 1, lq, lk) > 0.3 if masked else None
    mask = None if mask is None else mask | torch.eye(lq, lk, dtype=torch.bool)  # no empty rows
    lin = torch.nn.Linear(d, 16)
    with torch.no_grad(), FlopCount() as fc:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        lin(out)
    assert fc.attention == 2 * b * h * lq * lk * d * 2  # Q·Kᵀ and P·V, 2 FLOPs per multiply-add
    assert fc.other == 2 * (b * h * lq) * d * 16  # the linear layer
    assert fc.total == fc.attention + fc.other
