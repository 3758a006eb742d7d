"""Wan VAE: streaming decode parity, encode shapes, real-size key layout, checkpoint round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from livetalk_cli.checkpoint import read_state_dict
from livetalk_cli.config import VAEConfig, preset, video_frames_for_latents
from livetalk_cli.errors import CheckpointError
from livetalk_cli.models.vae import (
    Resample,
    StillReference,
    VAEStreamCache,
    WanVAE,
)


def _tiny_vae(seed: int = 0) -> WanVAE:
    """Tiny VAE with every weight random (incl. the zero-init attention proj and the norm gammas)."""
    torch.manual_seed(seed)
    vae = WanVAE(preset("tiny").vae).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("proj.weight"):
                p.copy_(0.2 * torch.randn_like(p))
        # Non-trivial latent statistics so the (de)normalisation is exercised too.
        vae.mean = torch.linspace(-0.5, 0.5, vae.cfg.z_dim)
        vae.std = torch.linspace(0.5, 2.0, vae.cfg.z_dim)
    return vae


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return _tiny_vae()


def _latents(num: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, num, 4, 4, generator=g)  # (B, z, F, h, w) -> 32x32 video


@torch.no_grad()
@pytest.mark.parametrize("num_latent", [1, 2, 3, 5])
def test_decoder_contract_matches_whole_decode(vae: WanVAE, num_latent: int) -> None:
    z = _latents(num_latent)
    whole = vae.decode(z)
    assert whole.shape == (1, 3, video_frames_for_latents(num_latent), 32, 32)
    # The output must not be saturated, or the clamp could hide a cache bug.
    assert (whole.abs() < 0.99).float().mean() > 0.5

    frame, slots = vae.decode_first(z[:, :, :1])
    names, shapes = vae.decoder_slot_names(), [s.shape for s in slots]
    assert len(names) == len(slots) == vae.decoder.num_cache_slots and len(set(names)) == len(names)
    parts = [frame]
    for i in range(1, num_latent):
        before = [s.clone() for s in slots]
        part, new = vae.decode_next(z[:, :, i: i + 1], slots)
        assert all(torch.equal(a, b) for a, b in zip(before, slots, strict=True))  # inputs untouched
        assert [s.shape for s in new] == shapes  # fixed slot shapes: one engine signature
        parts.append(part)
        slots = new
    assert [p.shape[2] for p in parts] == [1] + [4] * (num_latent - 1)
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=1e-5)
    if num_latent >= 3:  # chunks of several latents: the same frames, the same slot shapes
        first, slots = vae.decode_first(z[:, :, :2])
        rest, slots = vae.decode_next(z[:, :, 2:], slots)
        assert [s.shape for s in slots] == shapes
        torch.testing.assert_close(torch.cat([first, rest], dim=2), whole, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="latents"):
        vae.decode_next(z[:, :, :0], slots)


@torch.no_grad()
def test_vae_stream_without_anchor_is_the_plain_stream(vae: WanVAE) -> None:
    from livetalk_cli.runtime.vae_stream import VAEStream

    z = _latents(7, seed=3)
    stream = VAEStream(vae)
    parts = []
    for block in z.split(3, dim=2):
        stream.begin_block()
        parts.append(stream.decode(block))
    torch.testing.assert_close(torch.cat(parts, dim=2), vae.decode(z), atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("history", [0, 2])
def test_vae_stream_anchor_rebuilds_the_cache_from_the_first_latent(vae: WanVAE, history: int) -> None:
    """Anchored every 2 blocks: blocks 0-1 decode as usual; block 2 is exactly the tail of a fresh
    decode of [first latent, the `history` latents before it, block 2]; block 3 continues from there."""
    from livetalk_cli.runtime.vae_stream import VAEStream

    z = _latents(12, seed=4)
    blocks = list(z.split(3, dim=2))
    stream = VAEStream(vae, anchor_every=2, history=history)
    got = []
    for block in blocks:
        stream.begin_block()
        got.append(stream.decode(block))
    plain = vae.decode(z)
    torch.testing.assert_close(torch.cat(got[:2], dim=2), plain[:, :, :21], atol=1e-5, rtol=1e-5)
    hist = z[:, :, 6 - history: 6]
    anchored = vae.decode(torch.cat([z[:, :, :1], hist, z[:, :, 6:12]], dim=2))
    skip = 1 + 4 * history  # the anchor's own frames
    torch.testing.assert_close(torch.cat(got[2:], dim=2), anchored[:, :, skip:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[2], plain[:, :, 21:33], atol=1e-3)  # the anchor changed what block 2 sees


@torch.no_grad()
def test_vae_stream_settled_first_frame_is_the_still_latents_last_frame(vae: WanVAE) -> None:
    """Frame 0 becomes the last frame of a whole decode of [reference latent, its still latent];
    every later frame is the plain stream's (the decoder's history does not change), anchors too."""
    from livetalk_cli.runtime.vae_stream import VAEStream

    z = _latents(9, seed=6)
    still = _latents(1, seed=7)
    for every in (0, 2):
        plain, settled = VAEStream(vae, anchor_every=every), VAEStream(vae, anchor_every=every, settled=still)
        got, want = [], []
        for block in z.split(3, dim=2):
            for stream, out in ((plain, want), (settled, got)):
                stream.begin_block()
                out.append(stream.decode(block))
        got_v, want_v = torch.cat(got, dim=2), torch.cat(want, dim=2)
        expected0 = vae.decode(torch.cat([z[:, :, :1], still], dim=2))[:, :, -1]
        torch.testing.assert_close(got_v[:, :, 0], expected0, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got_v[:, :, 0], want_v[:, :, 0], atol=1e-3)
        torch.testing.assert_close(got_v[:, :, 1:], want_v[:, :, 1:], atol=0, rtol=0)


@torch.no_grad()
def test_vae_stream_anchor_cross_fades_from_the_continuation(vae: WanVAE) -> None:
    """With a fade of one block: block 2 (anchored) is the plain stream's block 2 blended into the
    anchored decode's, frame j of 12 weighing the anchored one (j + 1) / 13; block 3 is anchored."""
    from livetalk_cli.runtime.vae_stream import VAEStream

    z = _latents(12, seed=5)
    stream = VAEStream(vae, anchor_every=2, history=2, fade_latents=3)
    got = []
    for i, block in enumerate(z.split(3, dim=2)):
        stream.begin_block()
        parts = block.split([1, 2], dim=2) if i == 2 else [block]  # the fade spans chunks of a block
        got.append(torch.cat([stream.decode(part) for part in parts], dim=2))
    plain = vae.decode(z)
    anchored = vae.decode(torch.cat([z[:, :, :1], z[:, :, 4:6], z[:, :, 6:12]], dim=2))[:, :, 9:]
    w = torch.arange(1, 13, dtype=torch.float32).view(1, 1, 12, 1, 1) / 13
    expected = plain[:, :, 21:33] * (1 - w) + anchored[:, :, :12] * w
    torch.testing.assert_close(torch.cat(got[:2], dim=2), plain[:, :, :21], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[3], anchored[:, :, 12:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_vae_stream_anchor_without_history_restarts_each_block_after_the_reference(vae: WanVAE) -> None:
    """The demo's setting (anchor every block, history 0, a one-block fade): block k >= 1 is the
    decode of [reference latent, block k] cross-faded from the continuation of [reference latent,
    block k-1, block k]; the report's VAE-alone stream (`stream_roundtrip_frames`) decodes the same."""
    from livetalk_cli.config import StreamConfig
    from livetalk_cli.distill.data import video_tensor
    from livetalk_cli.distill.vae_stage import encode_chunked, stream_roundtrip_frames
    from livetalk_cli.runtime.stream import frames_to_uint8
    from livetalk_cli.runtime.vae_stream import VAEStream

    z = _latents(9, seed=6)
    stream = VAEStream(vae, anchor_every=1, history=0, fade_latents=3)
    got = []
    for block in z.split(3, dim=2):
        stream.begin_block()
        got.append(stream.decode(block))
    w = torch.arange(1, 13, dtype=torch.float32).view(1, 1, 12, 1, 1) / 13
    ref = z[:, :, :1]
    torch.testing.assert_close(got[0], vae.decode(z[:, :, :3]), atol=1e-5, rtol=1e-5)
    for k in (1, 2):
        blk, prev = z[:, :, 3 * k: 3 * k + 3], z[:, :, 3 * k - 3: 3 * k] if k > 1 else z[:, :, 1:3]
        cont = vae.decode(torch.cat([ref, prev, blk], dim=2))[:, :, -12:]
        anchored = vae.decode(torch.cat([ref, blk], dim=2))[:, :, -12:]
        torch.testing.assert_close(got[k], cont * (1 - w) + anchored * w, atol=1e-5, rtol=1e-5)
    frames = frames_to_uint8(vae.decode(z))  # (T, H, W, 3) uint8, T = 33
    zz = encode_chunked(vae, video_tensor(frames)[None], 33)
    again = VAEStream(vae, anchor_every=1, history=0, fade_latents=3)
    want = []
    for block in zz.split(3, dim=2):
        again.begin_block()
        want.append(frames_to_uint8(again.decode(block)))
    sc = StreamConfig(block_frames=3, vae_anchor_every=1, vae_anchor_history=0, vae_anchor_fade=3)
    assert (stream_roundtrip_frames(vae, frames, 33, sc) == np.concatenate(want)).all()


@torch.no_grad()
def test_vae_stream_anchor_after_still_latents_restarts_each_block_after_a_still_past(vae: WanVAE) -> None:
    """`vae_anchor_still` N = 3 (the demo's): block k >= 1 is the decode of [reference latent, still
    latents 1..2, block k] (frames of block k only), cross-faded from the un-anchored continuation;
    frame 0 is the settled frame (still latent 1 decoded after the reference latent alone). The
    report's VAE-alone stream encodes the still latents from the clip's frame 0 and decodes the same."""
    from livetalk_cli.config import StreamConfig
    from livetalk_cli.distill.data import video_tensor
    from livetalk_cli.distill.vae_stage import encode_chunked, stream_roundtrip_frames
    from livetalk_cli.runtime.stream import frames_to_uint8
    from livetalk_cli.runtime.vae_stream import VAEStream

    z = _latents(9, seed=7)
    still = torch.cat([z[:, :, :1], _latents(3, seed=8)[:, :, 1:]], dim=2)  # (1, C, 3, h, w), latent 0 = the reference
    sc = StreamConfig(block_frames=3, vae_anchor_every=1, vae_anchor_history=0, vae_anchor_fade=3,
                      vae_anchor_still=3, settled_first_frame=True)
    stream = VAEStream.for_stream(vae, sc, still=still)
    got = []
    for block in z.split(3, dim=2):
        stream.begin_block()
        got.append(stream.decode(block))
    w = torch.arange(1, 13, dtype=torch.float32).view(1, 1, 12, 1, 1) / 13
    first = vae.decode(z[:, :, :3])
    settled = vae.decode(still[:, :, :2])[:, :, -1:]
    torch.testing.assert_close(got[0], torch.cat([settled, first[:, :, 1:]], dim=2), atol=1e-5, rtol=1e-5)
    for k in (1, 2):
        blk = z[:, :, 3 * k: 3 * k + 3]
        cont = vae.decode(z[:, :, : 3 * k + 3])[:, :, -12:]  # k = 1: the continuation of the first block
        if k == 2:  # the decoder's slots after block 1's anchored decode, continued
            cont = vae.decode(torch.cat([still, z[:, :, 3:9]], dim=2))[:, :, -12:]
        anchored = vae.decode(torch.cat([still, blk], dim=2))[:, :, -12:]
        torch.testing.assert_close(got[k], cont * (1 - w) + anchored * w, atol=1e-5, rtol=1e-5)
    # it differs from the anchor after the reference latent alone
    assert (vae.decode(torch.cat([z[:, :, :1], z[:, :, 3:6]], 2))[:, :, -12:] - got[1]).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="first 3 still latents"):
        VAEStream.for_stream(vae, sc, still=still[:, :, :2])
    frames = frames_to_uint8(vae.decode(z))  # (T, H, W, 3) uint8, T = 33
    zz = encode_chunked(vae, video_tensor(frames)[None], 33)
    again = VAEStream.for_stream(vae, sc, still=vae.encode_reference(video_tensor(frames[:1])[None], 3))
    want = []
    for block in zz.split(3, dim=2):
        again.begin_block()
        want.append(frames_to_uint8(again.decode(block)))
    assert (stream_roundtrip_frames(vae, frames, 33, sc) == np.concatenate(want)).all()


@torch.no_grad()
def test_streaming_cache_is_needed(vae: WanVAE) -> None:
    """Decoding the third latent without the second one's history gives different output."""
    z = _latents(3, seed=3)
    whole = vae.decode(z)
    _, slots = vae.decode_first(z[:, :, :1])
    _, after_two = vae.decode_next(z[:, :, 1:2], slots)
    wrong, _ = vae.decode_next(z[:, :, 2:], slots)  # the history of latent 0 only
    right, _ = vae.decode_next(z[:, :, 2:], after_two)
    torch.testing.assert_close(right, whole[:, :, -4:], atol=1e-5, rtol=1e-5)
    assert (wrong - right).abs().max() > 1e-3


@torch.no_grad()
def test_resample_time_semantics_against_hand_formulas() -> None:
    """upsample3d: [x0, interleave(time_conv(x1..) with 2 zero frames in front)]; downsample3d:
    [x0, time_conv(x) (kernel 3, stride 2, no padding)]; both streamed through a cache too."""
    torch.manual_seed(6)
    x = torch.randn(1, 4, 5, 6, 6)

    up = Resample(4, "upsample3d")
    up.cache_slot, up.time_conv.cache_slot = -1, 0
    tc = F.conv3d(F.pad(x[:, :, 1:], (0, 0, 0, 0, 2, 0)), up.time_conv.weight, up.time_conv.bias)
    pairs = torch.stack([tc[:, :4], tc[:, 4:]], dim=3).reshape(1, 4, 8, 6, 6)  # (B,C,2T,H,W)
    frames = torch.cat([x[:, :, :1], pairs], dim=2).transpose(1, 2).reshape(9, 4, 6, 6)
    expected = up.resample(frames).reshape(1, 9, 2, 12, 12).transpose(1, 2)
    torch.testing.assert_close(up(x, None), expected, atol=1e-5, rtol=1e-5)
    cache = VAEStreamCache.empty(1)
    parts = []
    for i in range(5):
        parts.append(up(x[:, :, i : i + 1], cache))
        cache.started = True
    torch.testing.assert_close(torch.cat(parts, dim=2), expected, atol=1e-5, rtol=1e-5)

    down = Resample(4, "downsample3d")
    down.cache_slot = 0
    y = down.resample(x.transpose(1, 2).reshape(5, 4, 6, 6)).reshape(1, 5, 4, 3, 3).transpose(1, 2)
    tc = F.conv3d(y, down.time_conv.weight, down.time_conv.bias, stride=(2, 1, 1))
    expected = torch.cat([y[:, :, :1], tc], dim=2)
    torch.testing.assert_close(down(x, None), expected, atol=1e-5, rtol=1e-5)
    cache = VAEStreamCache.empty(1)
    first = down(x[:, :, :1], cache)
    cache.started = True
    rest = down(x[:, :, 1:], cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=2), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_encode_shapes_determinism_and_chunk_parity(vae: WanVAE) -> None:
    g = torch.Generator().manual_seed(4)
    video = torch.rand(1, 3, 9, 32, 32, generator=g) * 2 - 1  # T = 1 + 4 * 2
    z = vae.encode(video)
    assert z.shape == (1, 4, 3, 4, 4)
    torch.testing.assert_close(vae.encode(video), z, atol=0, rtol=0)

    # The chunked (streaming) encoder equals one uncached pass over the whole video.
    mu = vae.conv1(vae.encoder(video, None), None)[:, :4]
    mean, std = vae.mean.view(1, -1, 1, 1, 1), vae.std.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, (mu - mean) / std, atol=1e-5, rtol=1e-5)

    recon = vae.decode(z)
    assert recon.shape == video.shape
    assert recon.abs().max() <= 1.0

    # A single image (the reference frame) encodes to one latent frame, equal to the video's first.
    z1 = vae.encode(video[:, :, :1])
    assert z1.shape == (1, 4, 1, 4, 4)
    torch.testing.assert_close(z1, z[:, :, :1], atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError):
        vae.encode(video[:, :, :8])


@torch.no_grad()
def test_encode_reference_is_the_image_held_still(vae: WanVAE) -> None:
    image = torch.rand(1, 3, 1, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    single = vae.encode_reference(image, 0)
    torch.testing.assert_close(single, vae.encode(image), atol=0, rtol=0)
    assert vae.encode_reference(image, 1).shape == single.shape
    still = vae.encode_reference(image, 4)  # 13 identical frames → 4 latents
    assert still.shape == (1, 4, 4, 4, 4)
    torch.testing.assert_close(still, vae.encode(image.expand(-1, -1, 13, -1, -1)), atol=0, rtol=0)
    torch.testing.assert_close(still[:, :, :1], single, atol=1e-5, rtol=1e-5)  # latent 0 sees frame 0 alone
    # a causal encoder's latents depend on their position even for a still input: that is the point
    assert (still[:, :, 1] - still[:, :, 0]).abs().max() > 1e-3
    with pytest.raises(ValueError):
        vae.encode_reference(image.expand(-1, -1, 5, -1, -1), 4)
    # encoded as far as asked (a stream's blocks), the same latents
    lazy = StillReference(vae, image, 4)
    assert lazy.upto(2).shape[2] == 2 and lazy.upto(1).shape[2] == 2 and lazy.upto(9).shape[2] == 4
    torch.testing.assert_close(lazy.upto(4), still, atol=0, rtol=0)


def test_real_size_layout_on_meta() -> None:
    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531
    assert vae.decoder.num_cache_slots == 32
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert "mean" not in shapes and "std" not in shapes
    assert shapes["encoder.conv1.weight"] == (96, 3, 3, 3, 3)
    assert shapes["conv1.weight"] == (32, 32, 1, 1, 1)
    assert shapes["conv2.weight"] == (16, 16, 1, 1, 1)
    assert shapes["decoder.conv1.weight"] == (384, 16, 3, 3, 3)
    assert shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert shapes["decoder.upsamples.3.resample.1.weight"] == (192, 384, 3, 3)
    assert shapes["decoder.upsamples.4.shortcut.weight"] == (384, 192, 1, 1, 1)
    assert shapes["decoder.head.2.weight"] == (3, 96, 3, 3, 3)
    assert shapes["encoder.downsamples.5.time_conv.weight"] == (192, 192, 3, 1, 1)
    assert shapes["encoder.middle.1.norm.gamma"] == (384, 1, 1)
    assert shapes["encoder.middle.1.to_qkv.weight"] == (1152, 384, 1, 1)
    assert shapes["encoder.middle.1.proj.bias"] == (384,)
    assert shapes["decoder.upsamples.0.residual.0.gamma"] == (384, 1, 1, 1)
    assert shapes["decoder.upsamples.0.residual.6.weight"] == (384, 384, 3, 3, 3)


@torch.no_grad()
def test_checkpoint_round_trips(vae: WanVAE, tmp_path: Path) -> None:
    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    st_path, pth_path = tmp_path / "vae.safetensors", tmp_path / "vae.pth"
    save_file(sd, str(st_path))
    torch.save(sd, pth_path)
    z = _latents(2, seed=5)
    expected = vae.decode(z)
    for path, device in ((st_path, "meta"), (pth_path, "cpu")):
        with torch.device(device):
            other = WanVAE(preset("tiny").vae).eval()
        other.load_state_dict(read_state_dict(path), strict=True, assign=device == "meta")
        assert other.mean.device.type == "cpu"  # rebuilt after loading, also from a meta build
        other.mean, other.std = vae.mean.clone(), vae.std.clone()
        torch.testing.assert_close(other.decode(z), expected, atol=0, rtol=0)

    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"corrupt\.pth"):
        read_state_dict(bad)
    bad_st = tmp_path / "corrupt.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError):
        read_state_dict(bad_st)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")
