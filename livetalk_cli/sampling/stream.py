"""Audio in, avatar frames out, one block at a time — the loop render, bench and serve share.

Block n holds latent frames [n*bf, (n+1)*bf). Latent 0 is the reference image and decodes to one
video frame; every later latent decodes to `tf` (4) frames. So block 0 yields 1 + tf*(bf-1) video
frames and later blocks tf*bf, and video frame i is conditioned on the audio of frame i.
Latents are decoded as soon as their block is sampled (streaming VAE cache), so memory does not
grow with the stream's length.

Legend: B batch, C latent channels, f block frames, T video frames, H/W image size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from livetalk_cli.config import latents_for_video_frames
from livetalk_cli.errors import UserError
from livetalk_cli.models.audio import frame_features, samples_per_frame, window_frames
from livetalk_cli.models.dit import pack_audio_frames
from livetalk_cli.pipeline import LoadedModel
from livetalk_cli.sampling.block_sampler import BlockSampler


class NonFiniteOutput(UserError):
    """The model produced NaN or infinite values (bad weights or an unstable dtype)."""


def block_video_range(n: int, block_frames: int, temporal_factor: int) -> tuple[int, int]:
    """Video frames [start, end) that block n decodes to."""
    start = 0 if n == 0 else temporal_factor * (n * block_frames - 1) + 1
    return start, temporal_factor * ((n + 1) * block_frames - 1) + 1


def blocks_for_video_frames(num_frames: int, block_frames: int, temporal_factor: int) -> int:
    return math.ceil(latents_for_video_frames(num_frames, temporal_factor) / block_frames)


def frames_to_uint8(video: Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] → (T, H, W, 3) uint8 on the host; NaN/inf is an error here,
    where frames are emitted, not in the per-block path."""
    host = video[0].permute(1, 2, 3, 0).float().cpu()
    if not torch.isfinite(host).all():
        raise NonFiniteOutput("the model produced NaN/inf frames; check the checkpoint and --dtype")
    return ((host + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


class AvatarStream:
    def __init__(self, model: LoadedModel):
        cfg = model.cfg
        if not cfg.dit.has_audio:
            raise UserError(f"preset {cfg.name!r} has no audio conditioning; use an omniavatar preset")
        self.model, self.cfg = model, cfg
        self.sampler = BlockSampler(model.dit, cfg, device=model.device)
        self.spf = samples_per_frame(cfg.audio.sample_rate, cfg.fps)
        self.context_frames, self.lookahead_frames = window_frames(cfg.audio, cfg.fps)
        self.tf = cfg.vae.temporal_factor
        self.generator = torch.Generator(device=model.device)
        self.vae_dtype = next(model.vae.parameters()).dtype
        self.block = 0

    @torch.no_grad()
    def start(self, image: Tensor, prompt: str, seed: int = 0) -> None:
        """image: (3, H, W) in [-1, 1] at the preset's resolution."""
        m = self.model
        ref = m.vae.encode(image[None, :, None].to(m.device, self.vae_dtype)).float()  # (1, C, 1, h, w)
        text_kv = m.dit.prepare_text(m.text_encoder([prompt]).to(m.device))
        self.sampler.start(text_kv, ref if self.cfg.dit.has_reference else None)
        self.vae_cache = m.vae.new_decode_cache()
        self.generator.manual_seed(seed)
        self.block = 0

    def video_range(self, n: int | None = None) -> tuple[int, int]:
        """Video frames [start, end) of block n (default: the next block)."""
        return block_video_range(self.block if n is None else n, self.cfg.stream.block_frames, self.tf)

    @torch.no_grad()
    def next_block(self, wave: Tensor) -> Tensor:
        """wave: (S,) float32 16 kHz audio so far (sample 0 = frame 0) → video (1, 3, T, H, W)."""
        m, cfg = self.model, self.cfg
        start, end = self.video_range()
        feats = frame_features(
            m.audio_encoder, wave, self.spf, start, end - start, self.context_frames, self.lookahead_frames
        )
        packed = pack_audio_frames(feats[None].float(), stream_start=self.block == 0, pack=self.tf)
        audio = m.dit.prepare_audio(packed.to(m.device))
        h, w = cfg.latent_hw
        noise = torch.randn(
            (cfg.stream.num_steps, 1, cfg.dit.out_dim, cfg.stream.block_frames, h, w),
            generator=self.generator, device=m.device,
        )
        x0 = self.sampler.denoise_block(noise, audio)
        self.block += 1
        return m.vae.decode_step(x0.to(self.vae_dtype), self.vae_cache)
