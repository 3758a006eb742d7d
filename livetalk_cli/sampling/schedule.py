"""Flow-matching schedule (Wan2.1): x_t = (1 - s) x0 + s * noise, the model predicts v = noise - x0."""

from __future__ import annotations

import torch
from torch import Tensor


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """s' = shift * s / (1 + (shift - 1) * s)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sampling_sigmas(num_steps: int, shift: float) -> Tensor:
    """The `num_steps` shifted sigmas of Wan's sampler, linspace(1, 0, N+1)[:-1], float64.

    With 4 steps and shift 5 the timesteps (1000 * sigma) are [1000, 937.5, 833.3, 625]; with
    48 steps the same values sit at indices 0, 12, 24, 36.
    """
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1], shift)


def x0_from_flow(x_t: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    return x_t - sigma * v


def renoise(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    return (1 - sigma) * x0 + sigma * noise


def pin_frames(x: Tensor, ref: Tensor, pin: Tensor) -> Tensor:
    """OmniAvatar's reference pinning, the one implementation: frames where `pin` is 1 become the
    reference latent. x: (B, C, F, h, w); ref: (B, C, 1, h, w); pin: (1, 1, F, 1, 1) of 0/1. A
    multiply-add (static shapes, compiles), exact for finite values."""
    return x * (1 - pin) + ref * pin
