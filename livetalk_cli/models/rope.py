"""3D rotary position embedding (Wan2.1 layout) with fp32 cos/sin tables.

The head dim is split into temporal / height / width bands (44/42/42 real dims for head_dim 128),
each with its own frequency set (theta 10000). Pairs are adjacent channels (2i, 2i+1), as in Wan's
complex view. Angles are computed in float64 once, outside the hot path, and stored as fp32 tables
(no complex numbers, no float64 in anything that is compiled or exported).

Legend: L tokens, H heads, D head_dim, P = D // 2 rotation pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from livetalk_cli.config import DiTConfig


def _inv_freq(band_dim: int, theta: float = 10000.0) -> Tensor:
    return 1.0 / theta ** (torch.arange(0, band_dim, 2, dtype=torch.float64) / band_dim)


class Rope3D:
    """Builds (cos, sin) tables of shape (L, P) for tokens laid out frame-major, then h, then w."""

    def __init__(self, cfg: DiTConfig, grid_hw: tuple[int, int], device: torch.device | str = "cpu"):
        t_dim, h_dim, w_dim = cfg.rope_bands()
        self.inv_t = _inv_freq(t_dim).to(device)
        h, w = grid_hw
        self.grid_hw = grid_hw
        ang_h = torch.outer(torch.arange(h, dtype=torch.float64), _inv_freq(h_dim))  # (h, h_dim/2)
        ang_w = torch.outer(torch.arange(w, dtype=torch.float64), _inv_freq(w_dim))  # (w, w_dim/2)
        spatial = torch.cat(
            [ang_h[:, None, :].expand(h, w, -1), ang_w[None, :, :].expand(h, w, -1)], dim=-1
        ).reshape(h * w, -1)  # (S, (h_dim + w_dim) / 2)
        self.spatial = spatial.to(device)
        self.tokens_per_frame = h * w

    def tables(self, frame_pos: Tensor) -> tuple[Tensor, Tensor]:
        """frame_pos: (F,) integer temporal positions → cos, sin (F*S, P) float32."""
        ang_t = frame_pos.to(torch.float64)[:, None] * self.inv_t  # (F, t_dim/2)
        f, s = ang_t.shape[0], self.tokens_per_frame
        ang = torch.cat(
            [ang_t[:, None, :].expand(f, s, -1), self.spatial[None].expand(f, s, -1)], dim=-1
        ).reshape(f * s, -1)
        return ang.cos().float(), ang.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs. x: (B, L, H, D); cos/sin: (L, P) fp32. Math in fp32 (island)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, L, H, P, 2)
    x_even, x_odd = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x_even * c - x_odd * s, x_even * s + x_odd * c), dim=-1)
    return out.flatten(-2).to(x.dtype)
