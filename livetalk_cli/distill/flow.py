"""The DiT as a training module: raw conditions in, flow prediction out.

`FlowModel.forward` does the per-prompt and per-block preparation (text K/V, audio projections)
inside one forward, so DDP/FSDP see every parameter used in the call they wrap. Conditions:

* context: (B, Lt, text_dim) text-encoder output; the unconditional branch uses the empty prompt.
* audio: (B, T, A) per-video-frame features of a stream-start run (packed here); zeros = none.
* ref: (B, C, R, h, w) reference latents (`WanVAE.encode_reference`): ref[:, :, :1] is pinned as latent
  frame 0; `y` gives each latent position its reference latent (`reference_conditioning`).

Legend: B batch, C latent channels, F latent frames, h/w latent size, T video frames.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from livetalk_cli.config import DiTConfig
from livetalk_cli.models.attention import SelfAttention
from livetalk_cli.models.dit import Conditioning, WanDiT, pack_audio_frames
from livetalk_cli.sampling.block_sampler import reference_conditioning
from livetalk_cli.sampling.causal import sequence_attention
from livetalk_cli.sampling.schedule import pin_frames


class FlowModel(nn.Module):
    def __init__(self, dit: WanDiT):
        super().__init__()
        self.dit = dit

    @property
    def cfg(self) -> DiTConfig:
        return self.dit.cfg

    def conditioning(self, context: Tensor, audio: Tensor, ref: Tensor, num_frames: int,
                     *, frame_offset: int = 0) -> Conditioning:
        """Prepare text K/V, audio projections and `y` for latent frames [offset, offset + F)."""
        packed = pack_audio_frames(audio, stream_start=True, pack=self.dit.cfg.audio_pack_frames)
        proj = self.dit.prepare_audio(packed)[:, :, frame_offset: frame_offset + num_frames]
        y = reference_conditioning(ref, num_frames, first_known=frame_offset == 0, offset=frame_offset,
                                   positions=self.dit.cfg.reference_positions)
        return Conditioning(self.dit.prepare_text(context), y, proj)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, audio: Tensor, ref: Tensor,
                attn: SelfAttention | None = None, block_frames: int | None = None) -> Tensor:
        """x: (B, C, F, h, w), t: (B, F) → v (B, C, F, h, w) fp32.

        attn None: sequence attention over x's frames, bidirectional (`block_frames` None) or
        block-causal.
        """
        cond = self.conditioning(context, audio, ref, x.shape[2])
        if attn is None:
            _, ph, pw = self.dit.cfg.patch_size
            attn = sequence_attention(self.dit, x.shape[2], (x.shape[-2] // ph, x.shape[-1] // pw),
                                      block_frames=block_frames, device=x.device)
        return self.dit(x, t, cond, attn)


def pin_reference(x: Tensor, ref: Tensor) -> Tensor:
    """Latent frame 0 := the reference latent (ref: (B, C, R, h, w), its latent 0)."""
    pin = torch.zeros(1, 1, x.shape[2], 1, 1, device=x.device, dtype=x.dtype)
    pin[:, :, 0] = 1
    return pin_frames(x, ref[:, :, :1].to(x.dtype), pin)


def drop_conditions(context: Tensor, audio: Tensor, empty: Tensor, drop_text: Tensor,
                    drop_audio: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample condition dropout: drop_*: (B,) bool. `empty`: (1, Lt, D) empty-prompt context."""
    context = torch.where(drop_text[:, None, None], empty.to(context.dtype), context)
    audio = torch.where(drop_audio[:, None, None], torch.zeros_like(audio), audio)
    return context, audio


def generated_mask(num_frames: int, device: torch.device) -> Tensor:
    """(1, 1, F, 1, 1): 1 on frames the model generates, 0 on the pinned reference frame."""
    m = torch.ones(1, 1, num_frames, 1, 1, device=device)
    m[:, :, 0] = 0
    return m


def masked_mse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Mean of (a - b)^2 over the generated frames; a per-sample mean, then a batch mean. A mask
    of per-position weights (broadcast to a's shape) gives the weighted mean."""
    err = (a - b).float().square() * mask
    per = err.flatten(1).sum(1) / (mask.expand_as(err).flatten(1).sum(1))
    return per.mean()
