"""The VAE side of a stream: latents in, frames out, through the decoder's engine contract.

Two calls, each `(latents, *named slots) -> (frames, *new slots)` with fixed-shape slots:
`WanVAE.decode_first` for the stream's first chunk (its first latent decodes to one frame) and
`WanVAE.decode_next` for every later chunk of 1..block_frames latents (4 frames each). The
runtime's chunk schedule is fixed: block 0 as [reference latent + first generated latent] (so the
first generated frame leaves early) and the rest of the block, every later block whole.

The identity anchor (`StreamConfig.vae_anchor_every`) is a cache reset plus a steady step: before
every `anchor_every`-th block the decoder's slots go back to those after the stream's first latent
alone (computed once, when first needed) and the last `history` latents are replayed through
`decode_next` (frames dropped), so the decoder always has the reference frame in its history.
"""

from __future__ import annotations

import torch
from torch import Tensor

from livetalk_cli.models.vae import WanVAE


class VAEStream:
    def __init__(self, vae: WanVAE, anchor_every: int = 0, history: int = 2):
        self.vae, self.every, self.history = vae, anchor_every, history
        self.dtype = next(vae.parameters()).dtype
        self.slots: list[Tensor] | None = None  # the decoder's named slots after the last call
        self.first: Tensor | None = None  # the stream's first latent (the reference), for the anchor
        self._anchor_slots: list[Tensor] | None = None  # the slots after `first` alone
        self.recent: Tensor | None = None  # the last `history` latents, replayed by the anchor
        self.blocks = 0

    @torch.no_grad()
    def begin_block(self) -> None:
        """Call once before decoding each block's latents (re-anchors when it is time)."""
        if self.every and self.blocks and self.blocks % self.every == 0 and self.first is not None:
            if self._anchor_slots is None:
                self._anchor_slots = self.vae.decode_first(self.first)[1]
            self.slots = self._anchor_slots  # the reset
            if self.recent is not None:
                self.slots = self.vae.decode_next(self.recent, self.slots)[1]
        self.blocks += 1

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Latents (1, C, f, h, w) → video (1, 3, T, H, W) in [-1, 1], continuing the stream."""
        z = z.to(self.dtype)
        if self.slots is None:
            self.first = z[:, :, :1]
            video, self.slots = self.vae.decode_first(z)
        else:
            video, self.slots = self.vae.decode_next(z, self.slots)
        if self.every and self.history:
            self.recent = (z if self.recent is None else torch.cat([self.recent, z], 2))[:, :, -self.history:]
        return video
