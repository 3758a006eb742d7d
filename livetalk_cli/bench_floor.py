"""`livetalk bench`'s FLOP floor: the model's FLOPs per frame and to the first frame (`flops`), over
the device's measured dense matmul rate (`matmul_rate`)."""

from __future__ import annotations

import statistics
import time

import torch

from livetalk_cli.bench import synchronize
from livetalk_cli.flops import FlopCount
from livetalk_cli.pipeline import LoadedModel
from livetalk_cli.runtime.stream import AvatarStream, StreamOptions


def matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Measured dense matmul rate in FLOP/s (square matrices; median of `repeats`)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if i:  # the first call is warm-up
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def flops(model: LoadedModel, wave: torch.Tensor, image: torch.Tensor, prompt: str) -> dict[str, float]:
    """DiT and VAE FLOPs: per generated frame in the steady state (full cache), and to the first frame.
    Attention is counted from its shapes (`FlopCount`), on every device."""
    stream = AvatarStream(model, StreamOptions(pipelined=False))
    cfg = model.cfg
    with FlopCount() as first_counter:  # start, the first block's passes, its first chunk
        stream.start(image, prompt, seed=0)
        x0, cond = stream.sample(wave)
        next(stream.decode(x0))  # the first-frame chunk only
    stream = AvatarStream(model, StreamOptions(pipelined=False))
    stream.start(image, prompt, seed=0)
    every = max(1, cfg.stream.vae_anchor_every)  # the VAE anchor's decode is shared by `every` blocks
    needed = 1 + (cfg.stream.sink_frames + cfg.stream.window_frames) // cfg.stream.block_frames
    for _ in range(max(needed, every + 1)):  # fill the sinks and the window; past the first anchor
        stream.next_block(wave)
    frames = stream.tf * cfg.stream.block_frames
    with FlopCount() as dit_counter:
        x0, cond = stream.sample(wave)
        stream.refill(x0, cond)
    with FlopCount() as vae_counter:  # `every` blocks: one anchor among them
        for _ in range(every):
            list(stream.decode(x0))
    return {
        "dit_per_frame": dit_counter.total / frames,
        "dit_attention_per_frame": dit_counter.attention / frames,
        "vae_decode_per_frame": vae_counter.total / (every * frames),
        "first_frame": float(first_counter.total),
        "counting": "torch FlopCounterMode for matmuls and convolutions; attention from its shapes, "
                    "2*Lq*Lk*D per head for QK^T and again for PV",
    }
