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
