"""Attention behind one function, and the self-attention contexts the DiT runs under.

The DiT never decides where its keys come from: each self-attention call goes through a
`SelfAttention` context. `SequenceAttention` attends within the tokens of the current forward
(bidirectional teacher, or block-causal training/reference with a mask); `BlockKVCache`
(sampling/kv_cache.py) attends over identity sinks + ring window + the block being denoised.

Legend: B batch, L tokens, H heads, D head_dim, F latent frames, S tokens per frame.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from livetalk_cli.models.rope import apply_rope


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention (reference backend: SDPA).

    q: (B, Lq, H, D), k/v: (B, Lk, H, D); mask: bool, True = may attend, broadcastable to
    (B, H, Lq, Lk). Returns (B, Lq, H, D).
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


class SelfAttention(Protocol):
    """Where a DiT layer's self-attention gets its keys and positions."""

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v: (B, L, H, D) for this forward's tokens, before RoPE. Returns (B, L, H, D)."""
        ...


class SequenceAttention:
    """Attention among this forward's own tokens (no cache), optional boolean token mask."""

    def __init__(self, cos: Tensor, sin: Tensor, mask: Tensor | None = None):
        self.cos, self.sin, self.mask = cos, sin, mask

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin), v, self.mask)


def block_causal_frame_mask(
    num_frames: int,
    block_frames: int,
    *,
    sink_frames: int | None = None,
    window_frames: int | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Frame-level mask (F, F), True = query frame may attend key frame.

    Block-causal: a frame sees every frame of its own block and of earlier blocks. With
    `window_frames` set, earlier blocks are limited to the identity sinks (the first
    `sink_frames` frames) and the `window_frames` frames just before the query's block — the
    same set the streaming KV cache holds.
    """
    idx = torch.arange(num_frames, device=device)
    block_start = idx // block_frames * block_frames  # (F,)
    q_start = block_start[:, None]
    k = idx[None, :]
    allowed = k < q_start + block_frames
    if window_frames is not None:
        sinks = k < (sink_frames or 0)
        recent = k >= q_start - window_frames
        allowed &= sinks | recent
    return allowed


def expand_frame_mask(frame_mask: Tensor, tokens_per_frame: int) -> Tensor:
    """(Fq, Fk) frame mask → (Fq*S, Fk*S) token mask."""
    s = tokens_per_frame
    return frame_mask.repeat_interleave(s, dim=0).repeat_interleave(s, dim=1)
