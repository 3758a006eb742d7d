"""Full-sequence forwards without a cache: block-causal (training, the cache's reference) and
bidirectional (the teacher).

Legend: B batch, C channels, F latent frames, h/w latent size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from livetalk_cli.models.attention import SequenceAttention, block_causal_frame_mask, expand_frame_mask
from livetalk_cli.models.dit import Conditioning, WanDiT
from livetalk_cli.models.rope import Rope3D


def sequence_attention(
    dit: WanDiT,
    num_frames: int,
    grid_hw: tuple[int, int],
    *,
    block_frames: int | None,
    sink_frames: int | None = None,
    window_frames: int | None = None,
    device: torch.device | str = "cpu",
) -> SequenceAttention:
    """Self-attention over frames 0..F-1 at their absolute positions.

    `block_frames=None` is bidirectional; otherwise block-causal, optionally limited to the
    identity sinks + a window as the streaming cache is.
    """
    rope = Rope3D(dit.cfg, grid_hw, device=device)
    cos, sin = rope.tables(torch.arange(num_frames, device=device))
    mask = None
    if block_frames is not None:
        frame_mask = block_causal_frame_mask(
            num_frames, block_frames, sink_frames=sink_frames, window_frames=window_frames, device=device
        )
        mask = expand_frame_mask(frame_mask, grid_hw[0] * grid_hw[1])
    return SequenceAttention(cos, sin, mask)


def causal_forward(
    dit: WanDiT,
    x: Tensor,
    t: Tensor,
    cond: Conditioning,
    block_frames: int,
    *,
    sink_frames: int | None = None,
    window_frames: int | None = None,
) -> Tensor:
    """One forward over x: (B, C, F, h, w) with per-frame t: (B, F) under the block-causal mask."""
    _, ph, pw = dit.cfg.patch_size
    grid = (x.shape[-2] // ph, x.shape[-1] // pw)
    attn = sequence_attention(
        dit, x.shape[2], grid, block_frames=block_frames, sink_frames=sink_frames,
        window_frames=window_frames, device=x.device,
    )
    return dit(x, t, cond, attn)
