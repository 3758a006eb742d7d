"""Shared builders for tests: a tiny DiT with non-trivial weights and random conditioning."""

from __future__ import annotations

import dataclasses

import torch

from livetalk_cli.config import ModelConfig, preset
from livetalk_cli.models.dit import WanDiT


def tiny_cfg(**stream_changes: object) -> ModelConfig:
    cfg = preset("tiny")
    if stream_changes:
        cfg = cfg.replace(stream=dataclasses.replace(cfg.stream, **stream_changes))
    cfg.validate()
    return cfg


def tiny_dit(cfg: ModelConfig, seed: int = 0) -> WanDiT:
    """The tiny DiT with every parameter random (Wan zero-inits the head; parity needs signal)."""
    torch.manual_seed(seed)
    dit = WanDiT(cfg.dit).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.numel() == cfg.dit.dim else 0.0))
    return dit


def random_text_kv(dit: WanDiT, cfg: ModelConfig, batch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    context = torch.randn(batch, cfg.dit.text_len, cfg.dit.text_dim)
    return dit.prepare_text(context)


def written_out_block(flow, noise, sigmas, ref, first_block: bool) -> torch.Tensor:
    """The student's block sampler written out from REFERENCE §5, for references: K steps of x0 =
    x - sigma * v and re-noise to the next sigma with that step's noise; in the stream's first
    block latent frame 0 is the reference latent at every step. flow(x, sigma) → v for the block.
    noise: (K, B, C, f, h, w); ref: (B, C, R, h, w) (latent 0 is pinned). Returns x0."""
    pin = torch.zeros(1, 1, noise.shape[3], 1, 1)
    if first_block:
        pin[:, :, 0] = 1
    r = ref[:, :, :1]
    x = noise[0]
    for i in range(noise.shape[0]):
        x = x * (1 - pin) + r * pin
        x0 = (x - sigmas[i] * flow(x, float(sigmas[i]))) * (1 - pin) + r * pin
        if i + 1 < noise.shape[0]:
            x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise[i + 1]
    return x0
