"""Cached block sampling equals an uncached block-causal reference (fp32, same noise)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from livetalk_cli.errors import UserError
from livetalk_cli.models.dit import Conditioning, pack_audio_frames
from livetalk_cli.sampling.block_sampler import BlockSampler, block_step, reference_conditioning
from livetalk_cli.sampling.causal import causal_forward
from livetalk_cli.sampling.schedule import sampling_sigmas
from livetalk_cli.sampling.teacher import teacher_sample
from tests.helpers import random_text_kv, tiny_cfg, tiny_dit, written_out_block

TOL = dict(atol=2e-4, rtol=2e-4)


def _stream_inputs(cfg, dit, n_blocks, seed=1, still=1):
    g = torch.Generator().manual_seed(seed)
    bf, k = cfg.stream.block_frames, cfg.stream.num_steps
    h, w = cfg.latent_hw
    c = cfg.dit.out_dim
    noise = [torch.randn(k, 1, c, bf, h, w, generator=g) for _ in range(n_blocks)]
    ref = torch.randn(1, c, still, h, w, generator=g)  # still > 1: one reference latent per position
    feats = torch.randn(1, 4 * bf * n_blocks - 3, cfg.dit.audio_dim, generator=g)
    audio = dit.prepare_audio(pack_audio_frames(feats, stream_start=True))  # (n, 1, F, D)
    return noise, ref, audio


def _record_forwards(dit):
    outs: list[torch.Tensor] = []
    handle = dit.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    return outs, handle


def _reference_stream(cfg, dit, text_kv, noise, ref, audio, *, sink=None, window=None, y_fn=None):
    """Sample block by block with one uncached forward per step over [clean past | noisy block]."""
    bf = cfg.stream.block_frames
    sig = sampling_sigmas(cfg.stream.num_steps, cfg.stream.shift).float()
    past: list[torch.Tensor] = []
    flows, outs = [], []
    for n, nz in enumerate(noise):
        f_total = (n + 1) * bf
        y = y_fn(f_total) if y_fn else reference_conditioning(ref, f_total, first_known=True)
        cond = Conditioning(text_kv, y, audio[:, :, :f_total])

        def flow(x, sigma, n=n, cond=cond):  # one uncached forward over [clean past | noisy block]
            t = torch.cat([torch.zeros(1, n * bf), torch.full((1, bf), sigma * 1000)], dim=1)
            v = causal_forward(dit, torch.cat(past + [x], dim=2), t, cond, bf, sink_frames=sink,
                               window_frames=window)[:, :, -bf:]
            flows.append(v)
            return v

        x0 = written_out_block(flow, nz, sig, ref, first_block=n == 0)
        past.append(x0)
        outs.append(x0)
    return flows, outs


def _cached_stream(cfg, dit, text_kv, noise, ref, audio):
    sampler = BlockSampler(dit, cfg)
    sampler.start(text_kv, ref)
    outs, handle = _record_forwards(dit)
    bf = cfg.stream.block_frames
    x0s = [sampler.denoise_block(nz, audio[:, :, n * bf : (n + 1) * bf]) for n, nz in enumerate(noise)]
    handle.remove()
    k = cfg.stream.num_steps
    flows = [o for j, o in enumerate(outs) if j % (k + 1) != k]  # drop the refill passes
    return flows, x0s


@pytest.mark.parametrize(("relative", "still"), [(True, 1), (False, 1), (True, 5)])
@torch.no_grad()
def test_cached_equals_uncached_reference_every_step(relative, still):
    # Capacity 12 frames = 4 blocks: nothing is evicted, so both RoPE modes see the same positions.
    cfg = tiny_cfg(sink_frames=3, window_frames=9, relative_rope=relative)
    dit = tiny_dit(cfg)
    text_kv = random_text_kv(dit, cfg)
    noise, ref, audio = _stream_inputs(cfg, dit, n_blocks=4, still=still)
    ref_flows, ref_x0 = _reference_stream(cfg, dit, text_kv, noise, ref, audio)
    flows, x0s = _cached_stream(cfg, dit, text_kv, noise, ref, audio)
    assert len(flows) == len(ref_flows) == 4 * cfg.stream.num_steps
    for a, b in zip(flows, ref_flows, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(x0s, ref_x0, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    # block 0 keeps the reference latent in frame 0; outputs are not trivially equal across blocks
    torch.testing.assert_close(x0s[0][:, :, :1], ref[:, :, :1])
    assert (x0s[1] - x0s[2]).abs().mean() > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("window", [3, 6])
def test_sinks_and_window_equal_masked_attention_with_eviction(window):
    # 1 sink block + a ring of 1 or 2 blocks over 7 blocks: the ring wraps several times. The
    # reference is uncached: every frame's K/V recomputed under the sink/window mask at absolute
    # positions (as Self Forcing and LiveTalk sample).
    cfg = tiny_cfg(sink_frames=3, window_frames=window, relative_rope=False)
    dit = tiny_dit(cfg, seed=3)
    text_kv = random_text_kv(dit, cfg)
    noise, ref, audio = _stream_inputs(cfg, dit, n_blocks=7, seed=4, still=7)  # positions >= 7 share one
    ref_flows, ref_x0 = _reference_stream(cfg, dit, text_kv, noise, ref, audio, sink=3, window=window)
    flows, x0s = _cached_stream(cfg, dit, text_kv, noise, ref, audio)
    for a, b in zip(flows, ref_flows, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(x0s, ref_x0, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    # the window matters: the full block-causal reference (no eviction) differs at the last block
    full_flows, _ = _reference_stream(cfg, dit, text_kv, noise, ref, audio)
    assert (full_flows[-1] - flows[-1]).abs().max() > 1e-3


@torch.no_grad()
def test_first_position_reference_streams_like_wan_i2v_conditioning():
    # reference_positions="first": y holds the reference latent at latent frame 0 only (zeros after
    # it, mask 0 there and 1 elsewhere), written out by hand for the uncached reference; the ring
    # wraps (1 sink block + 1 ring block over 4 blocks), so past block 1 only the sinks see frame 0.
    cfg = tiny_cfg(sink_frames=3, window_frames=3, relative_rope=False)
    cfg = cfg.replace(dit=dataclasses.replace(cfg.dit, reference_positions="first"))
    cfg.validate()
    dit = tiny_dit(cfg, seed=8)
    text_kv = random_text_kv(dit, cfg)
    noise, ref, audio = _stream_inputs(cfg, dit, n_blocks=4, seed=9, still=5)

    def first_only(f_total):
        _, c, _, h, w = ref.shape
        y = torch.zeros(1, c + 1, f_total, h, w)
        y[:, :c, 0] = ref[:, :, 0]
        y[:, c, 1:] = 1.0
        return y

    ref_flows, ref_x0 = _reference_stream(cfg, dit, text_kv, noise, ref, audio, sink=3, window=3, y_fn=first_only)
    flows, x0s = _cached_stream(cfg, dit, text_kv, noise, ref, audio)
    for a, b in zip(flows, ref_flows, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(x0s, ref_x0, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    # the layout matters: the same weights with a reference latent at every position differ
    every = cfg.replace(dit=dataclasses.replace(cfg.dit, reference_positions="every"))
    _, x0s_every = _cached_stream(every, dit, text_kv, noise, ref, audio)
    assert (x0s_every[2] - x0s[2]).abs().mean() > 1e-2


def test_reference_settings_are_validated():
    cfg = tiny_cfg()
    bad = cfg.replace(dit=dataclasses.replace(cfg.dit, reference_positions="last"))
    with pytest.raises(UserError, match="reference_positions"):
        bad.validate()
    n = max(1, cfg.still_reference_latents)
    with pytest.raises(UserError, match=f"vae_anchor_still {n + 1} needs still_reference_latents >= {n + 1}"):
        cfg.replace(stream=dataclasses.replace(cfg.stream, vae_anchor_still=n + 1)).validate()
    with pytest.raises(UserError, match="vae_anchor_still must be >= 1"):
        cfg.replace(stream=dataclasses.replace(cfg.stream, vae_anchor_still=0)).validate()
    cfg.replace(stream=dataclasses.replace(cfg.stream, vae_anchor_still=n)).validate()


@torch.no_grad()
def test_reference_latents_given_block_by_block_equal_all_at_once():
    # how AvatarStream feeds a still reference (StillReference.upto before each block)
    cfg = tiny_cfg(sink_frames=3, window_frames=3)
    dit = tiny_dit(cfg, seed=5)
    text_kv = random_text_kv(dit, cfg)
    noise, ref, audio = _stream_inputs(cfg, dit, n_blocks=4, seed=6, still=7)
    _, whole = _cached_stream(cfg, dit, text_kv, noise, ref, audio)
    sampler = BlockSampler(dit, cfg)
    sampler.start(text_kv, ref[:, :, :3])
    lazy = []
    for n, nz in enumerate(noise):
        sampler.extend_reference(ref[:, :, : (n + 1) * 3])
        lazy.append(sampler.denoise_block(nz, audio[:, :, n * 3: (n + 1) * 3]))
    for a, b in zip(lazy, whole, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_block_step_compiles_fullgraph():
    """No graph breaks = no host syncs and no data-dependent Python control flow in the hot path."""
    torch._dynamo.reset()
    cfg = tiny_cfg()
    dit = tiny_dit(cfg)
    text_kv = random_text_kv(dit, cfg)
    noise, ref, audio = _stream_inputs(cfg, dit, n_blocks=2)
    eager = BlockSampler(dit, cfg)
    compiled = BlockSampler(dit, cfg)
    compiled.step = torch.compile(block_step, fullgraph=True, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        for s in (eager, compiled):
            s.start(text_kv, ref)
        for n in range(2):
            a = eager.denoise_block(noise[n], audio[:, :, 3 * n : 3 * n + 3])
            b = compiled.denoise_block(noise[n], audio[:, :, 3 * n : 3 * n + 3])
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_teacher_sampler_trajectory_and_cfg():
    cfg = tiny_cfg()
    dit = tiny_dit(cfg)
    text_kv = random_text_kv(dit, cfg)
    noise, ref, audio = _stream_inputs(cfg, dit, n_blocks=2)
    f = 6
    cond = Conditioning(text_kv, reference_conditioning(ref, f, first_known=True), audio[:, :, :f])
    uncond = Conditioning(
        dit.prepare_text(torch.zeros(1, cfg.dit.text_len, cfg.dit.text_dim)), cond.y, torch.zeros_like(cond.audio)
    )
    x_noise = torch.cat([noise[0][0], noise[1][0]], dim=2)
    x0, kept = teacher_sample(
        dit, x_noise, cond, uncond, num_steps=8, guidance=3.0, ref=ref, keep_steps=(0, 2, 4, 6, 8)
    )
    assert sorted(kept) == [0, 2, 4, 6, 8]
    torch.testing.assert_close(kept[8], x0)
    torch.testing.assert_close(kept[0][:, :, 1:], x_noise[:, :, 1:])
    torch.testing.assert_close(x0[:, :, :1], ref)
    x0_c, _ = teacher_sample(dit, x_noise, cond, None, num_steps=8, ref=ref)
    x0_g1, _ = teacher_sample(dit, x_noise, cond, uncond, num_steps=8, guidance=1.0, ref=ref)
    torch.testing.assert_close(x0_c, x0_g1)
    assert (x0_c - x0).abs().max() > 1e-3  # guidance changes the result


def test_student_timesteps_sit_on_teacher_trajectory():
    student = sampling_sigmas(4, 5.0)
    teacher = sampling_sigmas(48, 5.0)
    torch.testing.assert_close(student, teacher[[0, 12, 24, 36]])
    torch.testing.assert_close(student * 1000, torch.tensor([1000, 937.5, 833.3333, 625], dtype=torch.float64))
