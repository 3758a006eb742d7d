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

With `anchor_tail` (`StreamConfig.vae_anchor_still` N > 1) the anchor's slots are those after the
first latent and then the reference's still latents 1..N-1 (the reference image held still): the
decoder restarts from a steady, still past instead of the one-frame reference alone.

With a `settled` latent (`StreamConfig.settled_first_frame`) frame 0 is not the decoder's
one-frame output of the reference latent but the last frame of that still latent (the reference
image's second still latent) decoded after the reference latent alone, the steady path every later
frame takes; the decoder's history is unchanged (the stream continues from the first chunk).

The reset is not shown as a cut: for `fade_latents` latents after it the decoder also continues
from the slots it had (one more decode of those latents), and the frames cross-fade linearly from
that continuation to the anchored decode, frame j of N weighing the anchored one (j + 1) / (N + 1).
A demo stream drifts by ~35/255 (mean |difference|) between anchors; as a cut that was a colour
flash every 36 frames, faded over a block it is ~3/255 per frame, under the stream's own motion.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from livetalk_cli.config import StreamConfig, VAEConfig
from livetalk_cli.models.vae import WanVAE


class StreamingDecoder(Protocol):
    """The decoder's engine contract (`WanVAE`, or exported engines: `export/runtime.EngineDecoder`)."""

    cfg: VAEConfig

    def decode_first(self, z: Tensor) -> tuple[Tensor, list[Tensor]]: ...

    def decode_next(self, z: Tensor, slots: list[Tensor]) -> tuple[Tensor, list[Tensor]]: ...


class VAEStream:
    def __init__(self, vae: WanVAE | StreamingDecoder, anchor_every: int = 0, history: int = 2,
                 fade_latents: int = 0, dtype: torch.dtype | None = None, settled: Tensor | None = None,
                 anchor_tail: Tensor | None = None):
        self.vae, self.every, self.history = vae, anchor_every, history
        self.settled = settled  # (1, C, 1, h, w): frame 0's still latent, or None (the one-frame decode)
        self.anchor_tail = anchor_tail  # (1, C, n, h, w): still latents the anchor decodes after the first
        self.fade_frames = fade_latents * vae.cfg.temporal_factor  # 0: the anchor is a cut
        self._fade_slots: list[Tensor] | None = None  # the un-anchored decoder's slots while fading
        self._faded = 0  # frames of the fade already emitted
        # the latents' dtype: the module's, or given (an engine has no parameters)
        self.dtype = dtype if dtype is not None else next(vae.parameters()).dtype  # type: ignore[union-attr]
        self.slots: list[Tensor] | None = None  # the decoder's named slots after the last call
        self.first: Tensor | None = None  # the stream's first latent (the reference), for the anchor
        self._first_slots: list[Tensor] | None = None  # the slots after `first` alone
        self._anchor_slots: list[Tensor] | None = None  # ... and then `anchor_tail`
        self.recent: Tensor | None = None  # the last `history` latents, replayed by the anchor
        self.blocks = 0

    @classmethod
    def for_stream(cls, vae: WanVAE | StreamingDecoder, sc: StreamConfig, dtype: torch.dtype | None = None,
                   still: Tensor | None = None) -> VAEStream:
        """The decoder side of a stream with `sc`'s anchor (every, history, fade, still) and frame 0.
        still: (1, C, S, h, w) the reference's still latents from latent 0 (`StillReference.upto`),
        S >= `still_latents_needed(sc)`; None when that is 0."""
        need = still_latents_needed(sc)
        if need and (still is None or still.shape[2] < need):
            raise ValueError(f"this stream's decoder needs the reference's first {need} still latents")
        settled = still[:, :, 1:2] if sc.settled_first_frame and still is not None else None
        tail = still[:, :, 1: sc.vae_anchor_still] if sc.vae_anchor_still > 1 and still is not None else None
        return cls(vae, sc.vae_anchor_every, sc.vae_anchor_history, fade_latents=sc.vae_anchor_fade, dtype=dtype,
                   settled=settled, anchor_tail=tail)

    @torch.no_grad()
    def begin_block(self) -> None:
        """Call once before decoding each block's latents (re-anchors when it is time)."""
        if self.every and self.blocks and self.blocks % self.every == 0 and self.first is not None:
            anchor = self._anchor()
            if self.fade_frames:
                self._fade_slots, self._faded = self.slots, 0
            self.slots = anchor  # the reset
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
            if self.settled is not None:
                video = torch.cat([self._settled_frame(), video[:, :, 1:]], dim=2)
        else:
            video, self.slots = self.vae.decode_next(z, self.slots)
            if self._fade_slots is not None:
                video = self._cross_fade(z, video)
        if self.every and self.history:
            self.recent = (z if self.recent is None else torch.cat([self.recent, z], 2))[:, :, -self.history:]
        return video

    def _first(self) -> list[Tensor]:
        """The decoder's slots after the stream's first latent alone (computed once)."""
        if self._first_slots is None:
            self._first_slots = self.vae.decode_first(self.first)[1]
        return self._first_slots

    def _anchor(self) -> list[Tensor]:
        """The slots an anchor restarts from: after the first latent, then `anchor_tail` (once)."""
        if self._anchor_slots is None:
            slots = self._first()
            if self.anchor_tail is not None:
                for j in range(self.anchor_tail.shape[2]):  # one latent a call: any engine takes it
                    slots = self.vae.decode_next(self.anchor_tail[:, :, j: j + 1].to(self.dtype), slots)[1]
            self._anchor_slots = slots
        return self._anchor_slots

    def _settled_frame(self) -> Tensor:
        assert self.settled is not None
        return self.vae.decode_next(self.settled.to(self.dtype), self._first())[0][:, :, -1:]

    def _cross_fade(self, z: Tensor, anchored: Tensor) -> Tensor:
        """The anchored frames blended with the continuation of the decoder's pre-anchor slots."""
        assert self._fade_slots is not None
        n = min(z.shape[2], (self.fade_frames - self._faded) // self.vae.cfg.temporal_factor)  # latents left
        cont, self._fade_slots = self.vae.decode_next(z[:, :, :n], self._fade_slots)
        t = cont.shape[2]
        j = torch.arange(self._faded, self._faded + t, device=anchored.device, dtype=anchored.dtype)
        w = ((j + 1) / (self.fade_frames + 1)).view(1, 1, t, 1, 1)
        head = cont + (anchored[:, :, :t] - cont) * w
        self._faded += t
        if self._faded >= self.fade_frames:
            self._fade_slots = None
        return torch.cat([head, anchored[:, :, t:]], dim=2)


def still_latents_needed(sc: StreamConfig) -> int:
    """How many of the reference's still latents (from latent 0) a stream's decoder side uses."""
    need = sc.vae_anchor_still if sc.vae_anchor_every and sc.vae_anchor_still > 1 else 0
    return max(need, 2 if sc.settled_first_frame else 0)
