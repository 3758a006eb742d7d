"""The few-step causal block sampler (Self Forcing / LiveTalk student inference).

Per block: `num_steps` denoising steps (x0 prediction, then re-noise to the next sigma with fresh
noise), then one more pass at t = 0 (the refill) that writes the block's clean K/V into the cache.
In block 0 the first latent frame is the reference image's latent, pinned at every step.

`dit_pass` is the engine contract: tensors in (noisy latents, timesteps, conditioning, the
`KVWindow`), tensors out (flow, the block's K/V); it writes nothing. `denoise`, `refill` and
`block_step` are the host loop over it, written once: `BlockSampler` (render, bench, serving)
and DMD's rollout both run them, and `BlockKVCache.commit` stores the block between blocks.
An exported engine (`export/runtime.EnginePasses`) runs the same two passes in place of the eager
DiT: the host loop is the same.
`block_step` is the hot path: static shapes, no host syncs, so it compiles with
`torch.compile(fullgraph=True)`. Everything that changes between blocks (conditioning, the pin
mask) enters as tensors of fixed shape.

Legend: B batch, C latent channels, f block frames, h/w latent size, K steps.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from livetalk_cli.config import ModelConfig
from livetalk_cli.models.attention import KVWindow, WindowAttention
from livetalk_cli.models.dit import Conditioning, WanDiT
from livetalk_cli.sampling.kv_cache import BlockKVCache
from livetalk_cli.sampling.schedule import pin_frames, renoise, sampling_sigmas


def dit_pass(dit: WanDiT, x: Tensor, t: Tensor, cond: Conditioning, window: KVWindow, *, keep_kv: bool = False
             ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One DiT pass of a block: the engine contract, a pure function of tensors.

    x: (B, C, f, h, w) noisy latents; t: (B, f) timesteps; cond: text K/V, `y`, audio; window: the
    past K/V window, the block's RoPE tables and the valid slots. Returns the flow v (B, C, f, h, w)
    and, with `keep_kv`, the block's K (pre-RoPE) and V, each (NL, B, f*S, H, D) — what
    `BlockKVCache.commit` stores. Nothing is written anywhere: eager, compiled, graph-captured and
    exported runs of this function are interchangeable.
    """
    attn = WindowAttention(window, keep_kv)
    v = dit(x, t, cond, attn)
    if not keep_kv:
        return v, None, None
    k_blk, v_blk = attn.block_kv()
    return v, k_blk, v_blk


class PassRunner(Protocol):
    """The DiT's two passes run by something other than the eager module (an exported engine)."""

    def denoise_pass(self, x: Tensor, t: Tensor, cond: Conditioning, window: KVWindow) -> Tensor:
        """The flow of one denoising pass."""
        ...

    def refill_pass(self, x: Tensor, t: Tensor, cond: Conditioning, window: KVWindow) -> tuple[Tensor, Tensor]:
        """The block's K (pre-RoPE) and V from the t = 0 pass."""
        ...


DiTRunner = WanDiT | PassRunner


def _flow(dit: DiTRunner, x: Tensor, t: Tensor, cond: Conditioning, window: KVWindow) -> Tensor:
    if isinstance(dit, WanDiT):
        return dit_pass(dit, x, t, cond, window)[0]
    return dit.denoise_pass(x, t, cond, window)


def denoise(
    dit: DiTRunner,
    window: KVWindow,
    noise: Tensor,
    sigmas: Tensor,
    cond: Conditioning,
    ref: Tensor,
    pin: Tensor,
    grad_step: int | None = None,
) -> Tensor:
    """Denoise one block over the cached window.

    noise: (K, B, C, f, h, w), one draw per step; sigmas: (K,) fp32; ref: (B, C, 1, h, w)
    reference latent; pin: (1, 1, f, 1, 1), 1 where the frame is the pinned reference.
    `grad_step` (DMD's rollout): run steps 0..grad_step only, with autograd on that step alone.
    Returns x0 (B, C, f, h, w).
    """
    num_steps = noise.shape[0] if grad_step is None else grad_step + 1
    b, _, f = noise.shape[1:4]

    def step(x: Tensor, i: int) -> Tensor:
        x = pin_frames(x, ref, pin)
        v = _flow(dit, x, (sigmas[i] * 1000).expand(b, f), cond, window)
        return pin_frames(x - sigmas[i] * v, ref, pin)

    x = x0 = noise[0]
    for i in range(num_steps):
        if grad_step is None:
            x0 = step(x, i)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and i == grad_step):
                x0 = step(x, i)
        if i + 1 < num_steps:
            x = renoise(x0, noise[i + 1], sigmas[i + 1])
    return x0


def refill(dit: DiTRunner, window: KVWindow, x0: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
    """The t = 0 pass over the clean block: its K/V, for `BlockKVCache.commit`."""
    b, _, f = x0.shape[:3]
    t = torch.zeros(b, f, device=x0.device)
    if not isinstance(dit, WanDiT):
        return dit.refill_pass(x0, t, cond, window)
    _, k_blk, v_blk = dit_pass(dit, x0, t, cond, window, keep_kv=True)
    assert k_blk is not None and v_blk is not None
    return k_blk, v_blk


def block_step(
    dit: DiTRunner,
    window: KVWindow,
    noise: Tensor,
    sigmas: Tensor,
    cond: Conditioning,
    ref: Tensor,
    pin: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """`denoise` then `refill`, as one function (one compiled graph). Returns x0 and the block's K/V."""
    x0 = denoise(dit, window, noise, sigmas, cond, ref, pin)
    k_blk, v_blk = refill(dit, window, x0, cond)
    return x0, k_blk, v_blk


class BlockSampler:
    """Streams blocks of latents: `start()` once per stream, then `denoise_block()` per block.
    `passes`: run the DiT's passes through an exported engine instead of `dit` (which still
    fixes the cache's dtype). `attention`: the window's backend, resolved (`BlockKVCache`)."""

    def __init__(self, dit: WanDiT, cfg: ModelConfig, *, batch: int = 1, device: torch.device | str = "cpu",
                 passes: PassRunner | None = None, attention: str = "sdpa"):
        self.dit, self.cfg = dit, cfg
        self.runner: DiTRunner = dit if passes is None else passes
        self.device = torch.device(device)
        dtype = next(dit.parameters()).dtype
        h, w = cfg.latent_hw
        _, ph, pw = cfg.dit.patch_size
        self.cache = BlockKVCache(
            cfg.dit, cfg.stream, (h // ph, w // pw), batch=batch, device=self.device, dtype=dtype,
            attention=attention)
        self.sigmas = sampling_sigmas(cfg.stream.num_steps, cfg.stream.shift).float().to(self.device)
        f = cfg.stream.block_frames
        self._pin_rest = torch.zeros(1, 1, f, 1, 1, device=self.device)
        self._pin_ref = self._pin_rest.clone()
        self._pin_ref[:, :, 0] = 1.0  # block 0, frame 0: the reference latent
        self.step = block_step  # denoise + refill (one graph)
        self.denoise_fn = denoise  # the two halves, for pipelines that decode before the refill
        self.refill_fn = refill
        self.block_index = 0

    def accelerate(self, *, compile: bool = False, cuda_graphs: bool = False, backend: str = "inductor") -> None:
        """Compile the hot-path functions and/or replay them from CUDA graphs (see `accel`)."""
        from livetalk_cli.sampling.accel import accelerate

        for name, fn in (("step", block_step), ("denoise_fn", denoise), ("refill_fn", refill)):
            setattr(self, name, accelerate(fn, compile=compile, cuda_graphs=cuda_graphs, backend=backend))

    def start(self, text_kv: list[tuple[Tensor, Tensor]], ref_latent: Tensor | None) -> None:
        """New stream. ref_latent: (B, C, R, h, w) normalised reference latents from
        `WanVAE.encode_reference` (None for T2V)."""
        self.cache.reset()
        self.block_index = 0
        self.text_kv = text_kv
        if ref_latent is None:
            if self.cfg.dit.has_reference:
                raise ValueError("this model needs a reference latent")
            h, w = self.cfg.latent_hw
            self.ref = torch.zeros(self.cache.k.shape[1], self.cfg.dit.out_dim, 1, h, w, device=self.device)
            self.codes = None
            self._pin_first = self._pin_rest
        else:
            self.ref = ref_latent[:, :, :1].to(self.device, torch.float32)
            self.codes = ref_latent.to(self.device, torch.float32)
            self._y_cache: dict[tuple[bool, int, int], Tensor] = {}
            self._pin_first = self._pin_ref

    def extend_reference(self, ref_latent: Tensor) -> None:
        """More still-reference latents (`StillReference.upto`) for the blocks to come."""
        if ref_latent.shape[2] > self.codes.shape[2]:
            self.codes = ref_latent.to(self.device, torch.float32)

    def _y(self, i: int) -> Tensor | None:
        """Block i's `y`: the reference latents of its positions (past the last one known, the last).
        Built once per distinct value, so a long stream reuses one tensor."""
        if self.codes is None:
            return None
        f, r = self.cfg.stream.block_frames, self.codes.shape[2]
        key = (i == 0, min(i * f, r - 1), r)
        if key not in self._y_cache:
            self._y_cache[key] = reference_conditioning(self.codes, f, first_known=i == 0, offset=i * f,
                                                        positions=self.cfg.dit.reference_positions)
        return self._y_cache[key]

    def _block_inputs(self, audio: Tensor | None) -> tuple[Conditioning, Tensor]:
        i = self.block_index
        return Conditioning(self.text_kv, self._y(i), audio), self._pin_first if i == 0 else self._pin_rest

    def denoise_block(self, noise: Tensor, audio: Tensor | None) -> Tensor:
        """noise: (K, B, C, f, h, w); audio: (num_audio_layers, B, f, D) or None → x0 (B, C, f, h, w).
        Denoise, refill and commit: the next call continues the stream."""
        cond, pin = self._block_inputs(audio)
        x0, k_blk, v_blk = self.step(self.runner, self.cache.window(), noise, self.sigmas, cond, self.ref, pin)
        self._commit(k_blk, v_blk)
        return x0

    def denoise(self, noise: Tensor, audio: Tensor | None) -> tuple[Tensor, Conditioning]:
        """First half of `denoise_block`: x0 and the conditioning `refill` needs. The frames can be
        decoded before the refill runs (first-frame latency, decode/DiT overlap)."""
        cond, pin = self._block_inputs(audio)
        return self.denoise_fn(self.runner, self.cache.window(), noise, self.sigmas, cond, self.ref, pin), cond

    def refill(self, x0: Tensor, cond: Conditioning) -> None:
        """Second half: the block's clean K/V, committed to the cache."""
        self._commit(*self.refill_fn(self.runner, self.cache.window(), x0, cond))

    def _commit(self, k_blk: Tensor, v_blk: Tensor) -> None:
        self.cache.commit(k_blk, v_blk)
        self.block_index += 1


def reference_conditioning(ref: Tensor, num_frames: int, *, first_known: bool, offset: int = 0,
                           positions: str = "every") -> Tensor:
    """OmniAvatar's `y`: reference latents for latent positions [offset, offset + F) + a mask channel.

    ref: (B, C, R, h, w) from `WanVAE.encode_reference`. R = 1: that latent at every position;
    R > 1: position j gets ref[:, :, min(j, R - 1)]. → (B, C+1, F, h, w); the mask is 0 on the
    known (reference) frame, 1 on frames to generate. `first_known` marks frame 0 of this run as
    the reference frame. `positions="first"` (`DiTConfig.reference_positions`): only absolute
    position 0 gets its reference latent, every later position zeros.
    """
    b, _, r, h, w = ref.shape
    mask = torch.ones(b, 1, num_frames, h, w, device=ref.device, dtype=ref.dtype)
    if first_known:
        mask[:, :, 0] = 0
    pos = torch.arange(offset, offset + num_frames, device=ref.device).clamp(max=r - 1)
    latents = ref.index_select(2, pos)
    if positions == "first":
        keep = (torch.arange(offset, offset + num_frames, device=ref.device) == 0).to(ref.dtype)
        latents = latents * keep.view(1, 1, num_frames, 1, 1)
    return torch.cat([latents, mask], dim=1)
