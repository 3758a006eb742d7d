"""DMD pieces: the training rollout is the inference sampler; gradients stop where they should;
the DMD loss has the gradient REFERENCE §5 prescribes."""

from __future__ import annotations

import copy

import pytest
import torch

from livetalk_cli.distill.dmd import Rollout, dmd_loss
from livetalk_cli.distill.flow import FlowModel, generated_mask, pin_reference
from livetalk_cli.models.dit import pack_audio_frames
from livetalk_cli.sampling.block_sampler import BlockSampler
from tests.helpers import tiny_cfg, tiny_dit

NB = 2  # blocks per rollout


def _setup(seed: int = 0, blocks: int = NB, refs: int = 1, **stream):
    """A tiny DiT and a batch of 2 rollout inputs over `blocks` blocks; the stream keeps every
    earlier block (no sinks) unless `stream` says otherwise; `refs` still-reference latents."""
    cfg = tiny_cfg(**(stream or {"sink_frames": 0, "window_frames": 3 * (blocks - 1)}))
    dit = tiny_dit(cfg, seed)
    torch.manual_seed(seed + 1)
    bf, k = cfg.stream.block_frames, cfg.stream.num_steps
    f = blocks * bf
    h, w = cfg.latent_hw
    c = cfg.dit.out_dim
    noise = torch.randn(k, 2, c, f, h, w)
    context = torch.randn(2, cfg.dit.text_len, cfg.dit.text_dim)
    audio = torch.randn(2, 1 + 4 * (f - 1), cfg.dit.audio_dim)
    ref = torch.randn(2, c, refs, h, w)
    return cfg, dit, noise, context, audio, ref


@torch.no_grad()
def test_rollout_with_last_exit_equals_inference_sampler():
    cfg, dit, noise, context, audio, ref = _setup()
    k, bf = cfg.stream.num_steps, cfg.stream.block_frames
    x = Rollout(FlowModel(dit), cfg.stream)(noise, context, audio, ref, exit_step=k - 1)

    sampler = BlockSampler(dit, cfg, batch=2)
    sampler.start(dit.prepare_text(context), ref)
    proj = dit.prepare_audio(pack_audio_frames(audio, stream_start=True))
    blocks = [sampler.denoise_block(noise[:, :, :, b * bf:(b + 1) * bf], proj[:, :, b * bf:(b + 1) * bf])
              for b in range(NB)]
    torch.testing.assert_close(x, torch.cat(blocks, dim=2), atol=2e-5, rtol=1e-5)
    assert torch.equal(x[:, :, :1], ref)  # the reference latent is pinned


@pytest.mark.parametrize("exit_step", [0, 2])
def test_rollout_gradient_stays_inside_its_block_and_exit_step(exit_step):
    cfg, dit, noise, context, audio, ref = _setup()
    dit.train()
    bf = cfg.stream.block_frames
    noise.requires_grad_(True)
    x = Rollout(FlowModel(dit), cfg.stream)(noise, context, audio, ref, exit_step=exit_step)
    x[:, :, bf:].square().sum().backward()  # a loss on block 1 only
    g = noise.grad
    assert g[:, :, :, :bf].abs().max() == 0  # block 0 reaches block 1 only through the no-grad refill
    assert g[exit_step, :, :, bf:].abs().max() > 0  # the exit step's noise carries gradient
    others = [i for i in range(cfg.stream.num_steps) if i != exit_step]
    assert g[others][:, :, :, bf:].abs().max() == 0  # earlier steps ran without gradient
    assert all(p.grad is not None for p in dit.blocks.parameters())


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    cfg, dit, noise, context, audio, ref = _setup()
    real = FlowModel(dit).eval()
    fake = FlowModel(copy.deepcopy(dit)).eval()
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    f = noise.shape[3]
    x = pin_reference(torch.randn_like(noise[0]), ref).requires_grad_(True)
    empty = torch.zeros(1, cfg.dit.text_len, cfg.dit.text_dim)
    sigma, eps, mask = torch.tensor([0.3, 0.8]), torch.randn_like(x), generated_mask(f, x.device)
    loss = dmd_loss(x, real, fake, context, empty, audio, ref, sigma, eps, 3.0, mask)
    loss.backward()

    with torch.no_grad():  # the same quantities, computed directly
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = pin_reference((1 - s) * x + s * eps, ref)
        t = (sigma * 1000)[:, None].expand(-1, f)
        v_c, v_u = real(x_t, t, context, audio, ref), real(x_t, t, empty.expand_as(context), 0 * audio, ref)
        real_x0 = x_t - s * (v_u + 3.0 * (v_c - v_u))
        fake_x0 = x_t - s * fake(x_t, t, context, audio, ref)
        count = mask.expand_as(x).flatten(1).sum(1)  # generated elements per sample
        norm = ((x - real_x0).abs() * mask).flatten(1).sum(1) / count
        grad = (fake_x0 - real_x0) / norm.view(-1, 1, 1, 1, 1)
        expected = grad * mask / (count.view(-1, 1, 1, 1, 1) * x.shape[0])
    torch.testing.assert_close(x.grad, expected, atol=1e-7, rtol=1e-4)
    assert loss.dtype == torch.float64

    # The critic agreeing with the teacher (no CFG) is a fixed point: no gradient at all.
    x.grad = None
    dmd_loss(x, real, real, context, empty, audio, ref, sigma, eps, 1.0, mask).backward()
    assert x.grad.abs().max() < 1e-6


def _block_calls(monkeypatch) -> list[int]:
    """A count of DiT block forwards, recomputations included (module hooks do not see those)."""
    from livetalk_cli.models.dit import DiTBlock

    calls, forward = [0], DiTBlock.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DiTBlock, "forward", counted)
    return calls


@pytest.mark.parametrize("block_frames", [None, 3])  # the teacher's and the ODE-init student's passes
def test_grad_checkpointing_gives_the_same_loss_and_gradients(block_frames, monkeypatch):
    """Recomputing each block's activations in backward changes nothing the optimiser sees (the
    reference: the same model without checkpointing); the blocks do run twice."""
    cfg, dit, noise, context, audio, ref = _setup()
    x = noise[0].clone()
    t = torch.full((2, x.shape[2]), 600.0)
    grads = []
    for on in (False, True):
        model = copy.deepcopy(dit).train().requires_grad_(True)
        model.grad_checkpointing = on
        calls = _block_calls(monkeypatch)
        loss = FlowModel(model)(x, t, context, audio, ref, block_frames=block_frames).square().mean()
        loss.backward()
        assert calls[0] == len(model.blocks) * (2 if on else 1)
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, g0), (loss1, g1) = grads
    assert loss1 == loss0 and g1.keys() == g0.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7)


def test_grad_checkpointing_leaves_kv_cache_passes_alone(monkeypatch):
    """The rollout reads a KV cache that later commits overwrite: its passes are never recomputed."""
    cfg, dit, noise, context, audio, ref = _setup()
    dit.train().requires_grad_(True).grad_checkpointing = True
    calls = _block_calls(monkeypatch)
    x = Rollout(FlowModel(dit), cfg.stream)(noise, context, audio, ref, exit_step=1)
    before = calls[0]
    x.square().sum().backward()
    assert calls[0] == before  # backward recomputed nothing


def _long_setup(blocks: int):
    """A stream with sinks and a ring that wraps within `blocks` blocks, relative positions (the
    demo's layout), and 4 still-reference latents."""
    return _setup(3, blocks, 4, sink_frames=3, window_frames=3, relative_rope=True)


@torch.no_grad()
def test_long_rollout_is_the_inference_stream_past_the_ring_wrap():
    """A rollout longer than the cache (5 blocks through 3 sinks + a 3-frame ring) runs the
    inference sampler's stream — evictions, relative positions, still-reference positions — and
    hands the scores its last 2 blocks with their first latent replaced by the reference."""
    blocks, scored = 5, 2
    cfg, dit, noise, context, audio, ref = _long_setup(blocks)
    k, bf = cfg.stream.num_steps, cfg.stream.block_frames
    x = Rollout(FlowModel(dit), cfg.stream, inference_cache=True)(noise, context, audio, ref, k - 1, scored)

    sampler = BlockSampler(dit, cfg, batch=2)
    sampler.start(dit.prepare_text(context), ref)
    proj = dit.prepare_audio(pack_audio_frames(audio, stream_start=True))
    out = [sampler.denoise_block(noise[:, :, :, b * bf:(b + 1) * bf], proj[:, :, b * bf:(b + 1) * bf])
           for b in range(blocks)]
    expected = torch.cat(out[-scored:], dim=2)
    expected[:, :, 0] = ref[:, :, 0]
    assert x.shape == expected.shape
    torch.testing.assert_close(x, expected, atol=2e-5, rtol=1e-5)


def test_long_rollout_gradient_reaches_only_the_scored_blocks():
    blocks, scored, exit_step = 4, 2, 1
    cfg, dit, noise, context, audio, ref = _long_setup(blocks)
    dit.train()
    bf = cfg.stream.block_frames
    noise.requires_grad_(True)
    x = Rollout(FlowModel(dit), cfg.stream, inference_cache=True)(noise, context, audio, ref, exit_step, scored)
    x[:, :, 1:].square().sum().backward()
    g = noise.grad
    first_scored = (blocks - scored) * bf
    assert g[:, :, :, :first_scored].abs().max() == 0  # earlier blocks ran without gradient
    assert g[exit_step, :, :, first_scored + 1:].abs().max() > 0
    others = [i for i in range(cfg.stream.num_steps) if i != exit_step]
    assert g[others].abs().max() == 0


def test_scored_audio_is_the_scored_latents_audio_as_a_stream_start():
    """Packed as a stream start, the view's audio gives latent j of the view (j >= 1) exactly the
    audio the whole rollout's packing gives that latent."""
    from livetalk_cli.distill.dmd import scored_audio

    total, scored = 15, 9
    audio = torch.randn(2, 1 + 4 * (total - 1), 5)
    view = scored_audio(audio, total, scored, 4)
    assert view.shape[1] == 1 + 4 * (scored - 1)
    whole = pack_audio_frames(audio, stream_start=True)
    part = pack_audio_frames(view, stream_start=True)
    torch.testing.assert_close(part[:, 1:], whole[:, total - scored + 1:])
    assert torch.equal(scored_audio(audio, total, total, 4), audio)  # from the start: the whole
