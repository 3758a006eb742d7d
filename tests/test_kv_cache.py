"""The sink + ring KV cache against references that never look at the cache's own state.

Each reference keeps the stream's whole history in a plain list (one entry per committed block,
pre-RoPE K and V per layer), gathers [sinks | the last W frames | the block] from it by frame
index, ropes the gathered keys with a RoPE written here from the formula (complex rotation, Wan's
t/h/w bands) at 0..n-1 (relative) or at absolute frame indices, and attends with an explicit
softmax. Rings of 2 blocks wrap several times, in both RoPE modes.
"""

from __future__ import annotations

import math

import pytest
import torch

from livetalk_cli.models.attention import WindowAttention
from livetalk_cli.models.dit import Conditioning, pack_audio_frames
from livetalk_cli.sampling.block_sampler import BlockSampler, reference_conditioning
from livetalk_cli.sampling.kv_cache import BlockKVCache
from livetalk_cli.sampling.schedule import sampling_sigmas
from tests.helpers import random_text_kv, tiny_cfg, tiny_dit, written_out_block

SINKS, WINDOW, BF = 3, 6, 3  # 1 sink block, a ring of 2 blocks
BLOCKS = 8  # the ring wraps at blocks 3, 4, ... (5 evictions)


def formula_rope(x: torch.Tensor, frame_pos: list[int], grid: tuple[int, int]) -> torch.Tensor:
    """x: (B, F*h*w, H, D) → rotated: adjacent channel pairs as complex numbers times e^{i·angle}.
    Bands: temporal D - 4*(D//6) real dims, then height and width 2*(D//6) each; theta 10000."""
    d = x.shape[-1]
    hw = 2 * (d // 6)
    bands = (d - 2 * hw, hw, hw)
    h, w = grid
    coords = [(f, i, j) for f in frame_pos for i in range(h) for j in range(w)]
    angles = []
    for f, i, j in coords:
        row = []
        for band, p in zip(bands, (f, i, j), strict=True):
            row += [p / 10000 ** (2 * m / band) for m in range(band // 2)]
        angles.append(row)
    ang = torch.tensor(angles, dtype=torch.float64)  # (L, D/2)
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    z = z * torch.polar(torch.ones_like(ang), ang)[None, :, None, :]
    return torch.view_as_real(z).flatten(-2).to(x.dtype)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) explicit softmax(q k^T / sqrt(D)) v in float64."""
    s = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v.double()).to(q.dtype)


def gathered_frames(n: int, relative: bool) -> tuple[list[int], list[int]]:
    """For block n: the history frames it attends to (sinks, then the last WINDOW frames before
    it, oldest first), and the RoPE position of each gathered frame followed by the block's own."""
    start = n * BF
    sinks = list(range(min(SINKS, start)))
    recent = [f for f in range(max(SINKS, start - WINDOW), start)]
    frames = sinks + recent
    own = list(range(start, start + BF))
    if relative:
        return frames, list(range(len(frames) + BF))
    return frames, frames + own


class HistoryAttention:
    """A `SelfAttention` context that is the reference stream's cache: every committed block's
    pre-RoPE K/V per layer in a list, gathered by frame index at every pass."""

    def __init__(self, grid: tuple[int, int], relative: bool):
        self.grid, self.relative = grid, relative
        self.history: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # [block][layer] (k, v)
        self.block = 0
        self.recording: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self, layer: int, q, k, v):
        frames, pos = gathered_frames(self.block, self.relative)
        s = self.grid[0] * self.grid[1]
        past_k = [self.history[f // BF][layer][0][:, (f % BF) * s:(f % BF + 1) * s] for f in frames]
        past_v = [self.history[f // BF][layer][1][:, (f % BF) * s:(f % BF + 1) * s] for f in frames]
        k_all = formula_rope(torch.cat([*past_k, k], dim=1), pos, self.grid)
        v_all = torch.cat([*past_v, v], dim=1)
        if self.recording is not None:
            self.recording.append((k, v))
        return softmax_attention(formula_rope(q, pos[-BF:], self.grid), k_all, v_all)


def _random_block(cfg, s, g):
    shape = (cfg.dit.num_layers, 1, BF * s, cfg.dit.num_heads, cfg.dit.head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _attention_errors(cache_cls, relative: bool, backend: str = "sdpa") -> list[float]:
    """Per block: max |cache attention - gathered-history reference| over every layer."""
    cfg = tiny_cfg(sink_frames=SINKS, window_frames=WINDOW, relative_rope=relative)
    grid = (4, 4)
    s = grid[0] * grid[1]
    cache = cache_cls(cfg.dit, cfg.stream, grid, attention=backend)
    ref = HistoryAttention(grid, relative)
    g = torch.Generator().manual_seed(0)
    errors = []
    for n in range(BLOCKS):
        q, _ = _random_block(cfg, s, g)
        k_blk, v_blk = _random_block(cfg, s, g)
        ref.block = n
        attn = WindowAttention(cache.window())
        err = 0.0
        for layer in range(cfg.dit.num_layers):
            got = attn(layer, q[layer], k_blk[layer], v_blk[layer])
            want = ref(layer, q[layer], k_blk[layer], v_blk[layer])
            err = max(err, (got - want).abs().max().item())
        errors.append(err)
        cache.commit(k_blk, v_blk)
        ref.history.append([(k_blk[i], v_blk[i]) for i in range(cfg.dit.num_layers)])
    return errors


@pytest.mark.parametrize("backend", ["sdpa", "csrc", "flex"])
@pytest.mark.parametrize("relative", [True, False])
@torch.no_grad()
def test_window_attention_equals_gathered_history_through_ring_wraps(relative, backend):
    """Every attention backend (csrc: the op's CPU implementation) through partial and wrapped rings."""
    errors = _attention_errors(BlockKVCache, relative, backend)
    assert max(errors) < 1e-5, errors


class NewestFirstRing(BlockKVCache):
    """A mutant: the wrapped ring's relative positions ordered newest first."""

    def slot_positions(self) -> list[int]:
        pos = super().slot_positions()
        ring = pos[self.sink_frames: self.past_slots]
        blocks = [ring[i: i + self.block_frames] for i in range(0, len(ring), self.block_frames)]
        order = sorted(range(len(blocks)), key=lambda b: blocks[b][0])  # oldest .. newest
        flipped = list(ring)
        for a, b in zip(order, reversed(order), strict=True):
            flipped[a * self.block_frames:(a + 1) * self.block_frames] = blocks[b]
        return pos[: self.sink_frames] + flipped + pos[self.past_slots:]


@torch.no_grad()
def test_the_reference_catches_a_newest_first_ring():
    errors = _attention_errors(NewestFirstRing, relative=True)
    assert max(errors[:4]) < 1e-5  # the same until the ring first wraps (at block 3's commit) ...
    assert min(errors[4:]) > 1e-2, errors  # ... and wrong in every block after it


def _stream_inputs(cfg, dit, seed=1):
    g = torch.Generator().manual_seed(seed)
    k = cfg.stream.num_steps
    h, w = cfg.latent_hw
    c = cfg.dit.out_dim
    noise = [torch.randn(k, 1, c, BF, h, w, generator=g) for _ in range(BLOCKS)]
    ref = torch.randn(1, c, 5, h, w, generator=g)  # still reference: positions >= 5 share one latent
    feats = torch.randn(1, 4 * BF * BLOCKS - 3, cfg.dit.audio_dim, generator=g)
    audio = dit.prepare_audio(pack_audio_frames(feats, stream_start=True))
    return noise, ref, audio


def _history_stream(cfg, dit, text_kv, noise, ref, audio, relative):
    """The sampler written out (`written_out_block`), then the t = 0 pass whose K/V join the history."""
    sig = sampling_sigmas(cfg.stream.num_steps, cfg.stream.shift).float()
    ctx = HistoryAttention((cfg.latent_hw[0] // 2, cfg.latent_hw[1] // 2), relative)
    outs = []
    for n, nz in enumerate(noise):
        ctx.block = n
        y = reference_conditioning(ref, BF, first_known=n == 0, offset=n * BF)
        cond = Conditioning(text_kv, y, audio[:, :, n * BF:(n + 1) * BF])
        x0 = written_out_block(lambda x, sigma, cond=cond: dit(x, torch.full((1, BF), sigma * 1000), cond, ctx),
                               nz, sig, ref, first_block=n == 0)
        ctx.recording = []
        dit(x0, torch.zeros(1, BF), cond, ctx)
        ctx.history.append(ctx.recording)
        ctx.recording = None
        outs.append(x0)
    return outs


@pytest.mark.parametrize(("relative", "backend"), [(True, "sdpa"), (False, "sdpa"), (True, "csrc")])
@torch.no_grad()
def test_cached_stream_equals_history_reference_through_ring_wraps(relative, backend):
    cfg = tiny_cfg(sink_frames=SINKS, window_frames=WINDOW, relative_rope=relative)
    dit = tiny_dit(cfg, seed=2)
    text_kv = random_text_kv(dit, cfg)
    noise, ref, audio = _stream_inputs(cfg, dit)
    want = _history_stream(cfg, dit, text_kv, noise, ref, audio, relative)
    sampler = BlockSampler(dit, cfg, attention=backend)
    sampler.start(text_kv, ref)
    got = [sampler.denoise_block(nz, audio[:, :, n * BF:(n + 1) * BF]) for n, nz in enumerate(noise)]
    for n, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=f"block {n}")
    assert sampler.cache.full and sampler.cache.window().mask is None  # the last blocks ran unmasked
    assert (got[-1] - got[-2]).abs().mean() > 1e-2  # blocks differ: the comparison has signal


@pytest.mark.parametrize("name", ["omniavatar-1.3b", "omniavatar-14b", "wan2.1-t2v-1.3b"])
def test_real_size_presets_sample_as_livetalk(name):
    """LiveTalk's inference (configs/causal_inference.yaml, `local_attn_size: 15`): 3-latent blocks,
    4 steps, 15 latent frames including the block being denoised, the first 9 pinned, absolute
    positions. Checked through a cache with the preset's stream settings (tiny dims)."""
    from dataclasses import asdict

    from livetalk_cli.config import preset

    stream = preset(name).stream
    assert {k: v for k, v in asdict(stream).items() if not k.startswith("vae_")} == {
        "block_frames": 3, "num_steps": 4, "shift": 5.0, "sink_frames": 9, "window_frames": 3,
        "relative_rope": False, "settled_first_frame": False}  # frame 0: the VAE's own one-frame decode
    cfg = tiny_cfg()
    cache = BlockKVCache(cfg.dit, stream, (1, 1))
    for _ in range(7):  # blocks 0-2 fill the sinks, 3 the ring; 4, 5, 6 evict
        k = torch.randn(cfg.dit.num_layers, 1, 3, cfg.dit.num_heads, cfg.dit.head_dim)
        cache.commit(k, k)
    pos = cache.slot_positions()
    assert len(pos) == 15 and cache.window().mask is None  # 15 frames attended, every one valid
    assert sorted(pos) == list(range(9)) + [18, 19, 20] + [21, 22, 23]  # sinks, 3 recent, the block
