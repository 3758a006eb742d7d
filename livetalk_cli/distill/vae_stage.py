"""Stage `vae`: the small causal VAE on world clips, then its latent mean/std, then the latent set.
Stage `decoder`: the VAE's decoder fine-tuned with the encoder frozen and extra loss on the mouth.

Loss per clip: L1 + MSE of the reconstruction (pixels in [-1, 1]) + `kl_weight` x KL of the
posterior N(mu, exp(logvar)) against N(0, I). Whole clips go through the causal encoder and
decoder in one call (the same frames as streaming, tested in test_vae). After training, the
per-channel mean and std of mu over `stats_clips` clips become the latent normalisation, so the
DiT sees unit-variance latents. The posterior log-variance starts at LOGVAR_INIT: with unit noise on
near-zero initial means the decoder would first learn only the mean picture.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from livetalk_cli.config import StreamConfig
from livetalk_cli.distill.context import StageContext, save_weights
from livetalk_cli.distill.data import encode_world, latents_complete, mouth_map, video_tensor, world_clip
from livetalk_cli.distill.markers import checkpoint_meta, mark_done, stage_done, stage_id
from livetalk_cli.distill.trainer import (
    TrainState,
    generator,
    make_optimizer,
    run_loop,
    train_step,
    wrap,
)
from livetalk_cli.models.audio import build_audio_encoder
from livetalk_cli.models.vae import WanVAE
from livetalk_cli.runtime.stream import frames_to_uint8
from livetalk_cli.runtime.vae_stream import VAEStream, still_latents_needed
from livetalk_cli.world.metrics import lip_sync

log = logging.getLogger(__name__)
LOGVAR_INIT = -6.0


class VAEAutoencoder(nn.Module):
    """Training view of `WanVAE`: video → (reconstruction, mu, logvar), unclamped. With
    `train_encoder=False` (the decoder stage) the encoder and the posterior sample run without
    gradients, so only `conv2` and the decoder learn."""

    def __init__(self, vae: WanVAE, train_encoder: bool = True):
        super().__init__()
        self.vae = vae
        self.train_encoder = train_encoder

    def forward(self, video: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            z2 = self.vae.conv1(self.vae.encoder(video, None), None)
            mu, logvar = z2.chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            z = mu + (0.5 * logvar).exp() * eps
        return self.vae.decoder(self.vae.conv2(z, None), None), mu, logvar


def vae_loss(model: nn.Module, video: Tensor, eps: Tensor, kl_weight: float) -> tuple[Tensor, dict[str, float]]:
    recon, mu, logvar = model(video, eps)
    l1 = (recon - video).abs().mean()
    mse = (recon - video).square().mean()
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean()
    return l1 + mse + kl_weight * kl, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


def run_vae_stage(ctx: StageContext) -> None:
    r, ranks = ctx.recipe, ctx.ranks
    st, directory = r.vae, ctx.out / "vae"
    cfg = r.model
    if not stage_done(ctx, "vae"):
        torch.manual_seed(r.seed)
        vae = WanVAE(cfg.vae).to(ctx.device)
        with torch.no_grad():  # posterior std starts at exp(-3) ~ 0.05: the decoder sees the signal from step 0
            vae.conv1.bias[cfg.vae.z_dim:].fill_(LOGVAR_INIT)
        model = wrap(VAEAutoencoder(vae), ranks, r.parallel)
        opt = make_optimizer(vae.parameters(), st.optim)
        params = list(vae.parameters())
        state = TrainState({"vae": model}, {"vae": (model, opt)})
        tf, sf = cfg.vae.temporal_factor, cfg.vae.spatial_factor
        ch, cw = (st.crop, st.crop) if st.crop else (cfg.height, cfg.width)

        def step_fn(step: int) -> dict[str, float]:
            frames_n = st.long_clip_frames if st.long_clip_frames and step >= st.long_clip_from else st.clip_frames
            lat_shape = (cfg.vae.z_dim, 1 + (frames_n - 1) // tf, ch // sf, cw // sf)

            def loss_fn(chunk: list[int]) -> tuple[Tensor, dict[str, float]]:
                videos, eps = [], []
                for i in chunk:
                    g = generator(r.seed, "vae", step, i)
                    seed = int(torch.randint(r.world.train_clips, (1,), generator=g))
                    frames = world_clip(cfg, seed, frames_n).frames
                    y0 = int(torch.randint(cfg.height - ch + 1, (1,), generator=g))
                    x0 = int(torch.randint(cfg.width - cw + 1, (1,), generator=g))
                    videos.append(video_tensor(frames[:, y0: y0 + ch, x0: x0 + cw]))
                    eps.append(torch.randn(lat_shape, generator=g))
                return vae_loss(model, torch.stack(videos).to(ctx.device), torch.stack(eps).to(ctx.device),
                                st.kl_weight)

            return train_step(model, opt, params, st.optim, st, step, ranks, loss_fn, ctx.precision)

        run_loop(stage="vae", directory=directory, loop=st, state=state, ranks=ranks, step_fn=step_fn,
                 meta=checkpoint_meta(ctx, "vae"), samples_per_step=st.batch_size,
                 on_progress=lambda d, t, v: ctx.progress("vae", d, t, v))
        stats = latent_stats(vae.eval(), ctx, st.stats_clips)
        save_weights(vae, directory / "vae.safetensors", ranks)
        if ranks.main:
            (directory / "latent_stats.json").write_text(json.dumps(stats, indent=1))
        mark_done(ctx, "vae", {"steps": st.steps})
        ranks.barrier()
    build_latent_set(ctx)


@torch.no_grad()
def latent_stats(vae: WanVAE, ctx: StageContext, num_clips: int) -> dict[str, list[float]]:
    """Per-channel mean/std of the posterior mean over world clips (held-out seeds)."""
    cfg = ctx.recipe.model
    mus = []
    for k in range(num_clips):
        clip = world_clip(cfg, ctx.recipe.world.heldout_seed + 500_000 + k, ctx.recipe.vae.clip_frames)
        video = video_tensor(clip.frames)[None].to(ctx.device)
        mus.append(vae.conv1(vae.encoder(video, None), None)[:, : cfg.vae.z_dim].float().cpu())
    mu = torch.cat(mus, dim=0).transpose(0, 1).flatten(1)  # (z, N*F*h*w)
    return {"mean": mu.mean(1).tolist(), "std": mu.std(1).clamp_min(1e-3).tolist()}


def build_latent_set(ctx: StageContext) -> None:
    """Encode clips [0, world.num_latent_clips) with the trained VAE (resumable by shard; shards
    from another VAE or with fewer clips are encoded again). A recipe's own `world.latents` is
    left as it is."""
    r = ctx.recipe
    if r.world.latents:
        return
    directory = ctx.latents_dir
    cfg = ctx.model_config()
    made_by = stage_id(ctx, "vae")
    n = r.world.num_latent_clips
    if latents_complete(directory, n, reference=cfg.still_reference_latents > 0, made_by=made_by):
        return
    vae = ctx.load_vae()
    encoder = build_audio_encoder(cfg, model_dir=None, random_weights=False, device="cpu")
    encode_world(directory, cfg, vae, encoder, num_clips=n, clip_frames=r.world.clip_frames, made_by=made_by,
                 rank=ctx.ranks.rank, world=ctx.ranks.world,
                 on_progress=lambda d, t: ctx.progress("latents", d, t))
    ctx.ranks.barrier()


# --- stage `decoder` -------------------------------------------------------------------------


def decoder_loss(model: nn.Module, video: Tensor, eps: Tensor, mouth_weight: float, mouth_map_weight: float,
                 dilate: int, temporal_weight: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Mouth-weighted L1 + MSE (weights normalised to mean 1) + the mouth-map term + the temporal
    term: the same weights on |(recon[t] - recon[t-1]) - (video[t] - video[t-1])|."""
    recon = model(video, eps)[0]
    target_map = mouth_map(video)
    with torch.no_grad():
        b, t, h, w = target_map.shape
        region = target_map.reshape(b * t, 1, h, w)
        if dilate:
            region = F.max_pool2d(region, 2 * dilate + 1, stride=1, padding=dilate)
        weight = 1.0 + mouth_weight * region.reshape(b, 1, t, h, w)
        weight = weight / weight.mean()
    l1 = ((recon - video).abs() * weight).mean()
    mse = ((recon - video).square() * weight).mean()
    mouth = (mouth_map(recon) - target_map).abs().mean() * 100.0
    loss, parts = l1 + mse + mouth_map_weight * mouth, {"l1": l1.item(), "mse": mse.item(), "mouth": mouth.item()}
    if temporal_weight:
        change = (recon[:, :, 1:] - recon[:, :, :-1]) - (video[:, :, 1:] - video[:, :, :-1])
        temporal = (change.abs() * (weight[:, :, 1:] + weight[:, :, :-1]) / 2).mean()
        loss, parts["temporal"] = loss + temporal_weight * temporal, temporal.item()
    return loss, parts


@torch.no_grad()
def roundtrip_frames(vae: WanVAE, frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) → the same frames encoded and decoded by `vae` (posterior mean)."""
    device = next(vae.parameters()).device
    video = video_tensor(frames)[None].to(device)
    return frames_to_uint8(vae.decode(vae.encode(video)))[: frames.shape[0]]


def roundtrip_lip_sync(vae: WanVAE, ctx: StageContext, num_clips: int) -> float:
    """Mean lip-sync correlation of held-out world clips encoded and decoded by `vae`: about the
    ceiling any model in its latent space reaches on this metric."""
    cfg = ctx.recipe.model
    scores = []
    for k in range(num_clips):
        clip = world_clip(cfg, ctx.recipe.world.heldout_seed + k, ctx.recipe.world.clip_frames)
        frames = roundtrip_frames(vae, clip.frames)
        scores.append(lip_sync(frames, clip.audio, cfg.audio.sample_rate, cfg.fps).correlation)
    return float(np.mean(scores)) if scores else float("nan")


@torch.no_grad()
def encode_chunked(vae: WanVAE, video: Tensor, chunk_frames: int) -> Tensor:
    """(B,3,T,H,W), T = 1 + 4k → normalised latents (B,z,1+k,h,w), `vae.encode` restarted every
    `chunk_frames` frames (chunks share their boundary frame; each later chunk drops its first
    latent): the latents the DiT is trained on (clips of the world's length) however long the
    video, never the encoder run past the length it was trained on."""
    parts = [vae.encode(video[:, :, s: s + chunk_frames]) for s in range(0, video.shape[2] - 1, chunk_frames - 1)]
    return torch.cat([parts[0], *(z[:, :, 1:] for z in parts[1:])], dim=2)


@torch.no_grad()
def stream_roundtrip_frames(vae: WanVAE, frames: np.ndarray, chunk_frames: int, sc: StreamConfig) -> np.ndarray:
    """uint8 (T, H, W, 3), T = 1 + 4k → the frames as a stream shows their true latents: encoded in
    `chunk_frames` chunks (`encode_chunked`, the latents the DiT learns) and decoded a block at a
    time by `VAEStream` with `sc`'s anchor, as `livetalk render` decodes."""
    device = next(vae.parameters()).device
    z = encode_chunked(vae, video_tensor(frames)[None].to(device), chunk_frames)
    need = still_latents_needed(sc)  # frame 0 is the reference image
    still = vae.encode_reference(video_tensor(frames[:1])[None].to(device), need) if need else None
    stream = VAEStream.for_stream(vae, sc, still=still)
    parts = []
    for s in range(0, z.shape[2], sc.block_frames):
        stream.begin_block()
        parts.append(frames_to_uint8(stream.decode(z[:, :, s: s + sc.block_frames])))
    return np.concatenate(parts)[: frames.shape[0]]


def stream_decode_error(vae: WanVAE, ctx: StageContext, num_clips: int, num_frames: int,
                        sc: StreamConfig) -> dict[str, float]:
    """Mean |decoded - true| (0..255) of held-out world streams of `num_frames` frames, encoded in
    world-length chunks (`encode_chunked`) and decoded block by block as `livetalk render` does
    (`VAEStream` with `sc`'s anchor): over the first second, the last second
    and all frames. A decoder that drifts on long streams shows last >> first."""
    cfg = ctx.recipe.model
    fps = cfg.fps
    errs = []
    for k in range(num_clips):
        clip = world_clip(cfg, ctx.recipe.world.heldout_seed + 700_000 + k, num_frames)
        out = stream_roundtrip_frames(vae, clip.frames, ctx.recipe.world.clip_frames, sc)
        errs.append(np.abs(out.astype(np.int16) - clip.frames.astype(np.int16)).mean(axis=(1, 2, 3)))
    e = np.mean(errs, axis=0)
    return {"first_s": float(e[1: 1 + fps].mean()), "last_s": float(e[-fps:].mean()), "all": float(e.mean()),
            "frames": num_frames, "clips": num_clips, "anchor_every": sc.vae_anchor_every,
            "history": sc.vae_anchor_history, "fade": sc.vae_anchor_fade}


def run_decoder_stage(ctx: StageContext) -> None:
    r, ranks = ctx.recipe, ctx.ranks
    st, directory = r.decoder, ctx.out / "decoder"
    if stage_done(ctx, "decoder"):
        return
    cfg = ctx.model_config()
    vae = ctx.load_vae()  # the vae stage's weights (this stage is not done yet)
    before = roundtrip_lip_sync(vae, ctx, st.eval_clips) if ranks.main else float("nan")
    params = list(vae.decoder.parameters()) + list(vae.conv2.parameters())
    for p in params:
        p.requires_grad_(True)
    model = wrap(VAEAutoencoder(vae, train_encoder=False), ranks, r.parallel)
    opt = make_optimizer(params, st.optim)
    state = TrainState({"vae": model}, {"vae": (model, opt)})
    tf, sf = cfg.vae.temporal_factor, cfg.vae.spatial_factor
    lat_shape = (cfg.vae.z_dim, 1 + (st.clip_frames - 1) // tf, cfg.height // sf, cfg.width // sf)

    def step_fn(step: int) -> dict[str, float]:
        def loss_fn(chunk: list[int]) -> tuple[Tensor, dict[str, float]]:
            videos, eps = [], []
            for i in chunk:
                g = generator(r.seed, "decoder", step, i)
                seed = int(torch.randint(r.world.train_clips, (1,), generator=g))
                videos.append(video_tensor(world_clip(cfg, seed, st.clip_frames).frames))
                eps.append(torch.randn(lat_shape, generator=g))
            return decoder_loss(model, torch.stack(videos).to(ctx.device), torch.stack(eps).to(ctx.device),
                                st.mouth_weight, st.mouth_map_weight, st.mouth_dilate,
                                st.temporal_weight if step >= st.temporal_from else 0.0)

        return train_step(model, opt, params, st.optim, st, step, ranks, loss_fn, ctx.precision)

    run_loop(stage="decoder", directory=directory, loop=st, state=state, ranks=ranks, step_fn=step_fn,
             meta=checkpoint_meta(ctx, "decoder"), samples_per_step=st.batch_size,
             on_progress=lambda d, t, v: ctx.progress("decoder", d, t, v))
    vae.eval().requires_grad_(False)
    after = roundtrip_lip_sync(vae, ctx, st.eval_clips) if ranks.main else float("nan")
    log.info("decoder: round-trip lip-sync %.3f -> %.3f on %d held-out clips", before, after, st.eval_clips)
    save_weights(vae, directory / "vae.safetensors", ranks)
    mark_done(ctx, "decoder", {"steps": st.steps, "roundtrip_lip_sync_before": before,
                               "roundtrip_lip_sync_after": after, "eval_clips": st.eval_clips})
    ranks.barrier()
