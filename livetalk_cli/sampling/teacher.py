"""Many-step bidirectional teacher sampler with classifier-free guidance (Euler, flow matching).

Used by distillation to produce ODE trajectories: with 48 steps and shift 5 the latents at steps
[0, 12, 24, 36, 48] sit exactly at the 4-step student's timesteps (and the clean end).

Legend: B batch, C channels, F latent frames, h/w latent size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from livetalk_cli.models.dit import Conditioning, WanDiT
from livetalk_cli.sampling.causal import sequence_attention
from livetalk_cli.sampling.schedule import pin_frames, sampling_sigmas


@torch.no_grad()
def teacher_sample(
    dit: WanDiT,
    noise: Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    *,
    num_steps: int = 48,
    shift: float = 5.0,
    guidance: float = 6.0,
    ref: Tensor | None = None,
    keep_steps: tuple[int, ...] = (),
) -> tuple[Tensor, dict[int, Tensor]]:
    """Sample x0 from noise: (B, C, F, h, w).

    CFG in `uncond + w * (cond - uncond)` form (two forwards per step); `uncond=None` or
    `guidance == 1` runs the conditional branch only. `ref` (B, C, R, h, w) pins latent frame 0 (its latent 0).
    Returns (x0, {step: x_step}) for the requested `keep_steps` (0 = the noise, num_steps = x0).
    """
    b, _, f, h, w = noise.shape
    _, ph, pw = dit.cfg.patch_size
    attn = sequence_attention(dit, f, (h // ph, w // pw), block_frames=None, device=noise.device)
    sig = sampling_sigmas(num_steps, shift).tolist() + [0.0]
    pin = torch.zeros(1, 1, f, 1, 1, device=noise.device)
    if ref is not None:
        pin[:, :, 0] = 1.0
        ref = ref[:, :, :1].to(noise.device, torch.float32)
    else:
        ref = torch.zeros_like(noise[:, :, :1])

    x = noise.float()
    kept: dict[int, Tensor] = {}
    for i in range(num_steps):
        x = pin_frames(x, ref, pin)
        if i in keep_steps:
            kept[i] = x.clone()
        t = torch.full((b, f), sig[i] * 1000, device=x.device)
        v = dit(x, t, cond, attn)
        if uncond is not None and guidance != 1.0:
            v_u = dit(x, t, uncond, attn)
            v = v_u + guidance * (v - v_u)
        x = x + (sig[i + 1] - sig[i]) * v
    x = pin_frames(x, ref, pin)
    if num_steps in keep_steps:
        kept[num_steps] = x.clone()
    return x, kept
