"""Exported components in the streaming loop: the DiT's passes and the VAE decoder as engines.

`EnginePasses` is the block sampler's `PassRunner`: it feeds the denoise and refill engines the
cache window (read-only; `BlockKVCache` still commits between passes), the prompt's K/V stacked
once per prompt, and the window's mask (all True once the cache is full). `EngineDecoder` is the
VAE stream's `StreamingDecoder`: the first-latent engine, then the steady step once per latent.
The host loop (steps, re-noise, ring commit, the VAE's chunk and anchor schedule) is the one
`render` runs with the eager model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from livetalk_cli.config import ModelConfig, VAEConfig
from livetalk_cli.export.backends import Engine
from livetalk_cli.export.contract import dit_feeds, stack_text_kv
from livetalk_cli.models.attention import KVWindow
from livetalk_cli.models.dit import Conditioning


class EnginePasses:
    def __init__(self, cfg: ModelConfig, denoise: Engine, refill: Engine, device: torch.device):
        self.cfg, self.denoise, self.refill = cfg, denoise, refill
        mask_spec = denoise.contract.inputs[-1]
        self._all_valid = torch.ones(mask_spec.shape, dtype=torch.bool, device=device)
        self._text_src: list[tuple[Tensor, Tensor]] | None = None
        self._text: tuple[Tensor, Tensor] | None = None

    def _feeds(self, x: Tensor, t: Tensor, cond: Conditioning, window: KVWindow) -> list[Tensor]:
        if cond.text_kv is not self._text_src:  # a new prompt: stack its per-layer K/V once
            self._text_src, self._text = cond.text_kv, stack_text_kv(cond.text_kv)
        assert self._text is not None
        mask = window.mask if window.mask is not None else self._all_valid
        return dit_feeds(self.cfg, x.contiguous(), t.contiguous(), cond, self._text, window, mask)

    def denoise_pass(self, x: Tensor, t: Tensor, cond: Conditioning, window: KVWindow) -> Tensor:
        return self.denoise(*self._feeds(x, t, cond, window))[0]

    def refill_pass(self, x: Tensor, t: Tensor, cond: Conditioning, window: KVWindow) -> tuple[Tensor, Tensor]:
        k, v = self.refill(*self._feeds(x, t, cond, window))
        return k, v


class EngineDecoder:
    def __init__(self, cfg: VAEConfig, first: Engine, step: Engine):
        self.cfg, self.first, self.step = cfg, first, step

    def decode_first(self, z: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(1, C, T, h, w) → frames (1, 3, 1 + 4(T-1), H, W) and the slots after them."""
        frames, *slots = self.first(z[:, :, :1].contiguous())
        if z.shape[2] == 1:
            return frames, slots
        rest, slots = self.decode_next(z[:, :, 1:], slots)
        return torch.cat([frames, rest], dim=2), slots

    def decode_next(self, z: Tensor, slots: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """(1, C, T, h, w) and the slots before → frames (1, 3, 4T, H, W) and the new slots."""
        chunks = []
        for j in range(z.shape[2]):
            frames, *slots = self.step(z[:, :, j: j + 1].contiguous(), *slots)
            chunks.append(frames)
        return torch.cat(chunks, dim=2), slots


@dataclass
class EngineSet:
    """What `--engine` loaded: the folder and, per side, the backend that runs it (None: eager)."""

    path: Path
    dit_backend: str
    vae_backend: str
    passes: EnginePasses | None
    decoder: EngineDecoder | None
