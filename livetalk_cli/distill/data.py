"""Training data: world clips as tensors, and the encoded latent dataset the DiT stages read.

Every clip starts a stream, so its video frame 0 is the reference image itself (the VAE encodes
the first frame alone, so latent frame 0 *is* the reference latent the sampler pins). Audio
features are the model's own encoder over the whole clip (for log-mel identical to the
block-by-block features at inference), packed per latent frame as at a stream's start.

The latent dataset is written once after the VAE stage, in shards of `SHARD` clips:
`latents/shard_00000.safetensors` with `latents` (N, C, F, h, w) fp16, `audio` (N, T, A) fp16,
`mouth` (N, h, w) fp16 (where the mouth is, on the latent grid: `mouth_region`), `index` (N,) clip
seeds, and for models with `still_reference_latents` > 0 `reference` (N, C, R, h, w) fp16 (the
reference image as a still video, `WanVAE.encode_reference`); the shard's metadata holds the
prompts and, for world sets, `vae`: the id of the VAE that encoded it (`markers.stage_id`). Shards
are resumable; a shard without `reference` that the model needs gains it in place, and one with
fewer clips than the set now needs (a `--max-steps` run's) or from another VAE is encoded again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from livetalk_cli.config import ModelConfig
from livetalk_cli.errors import UserError
from livetalk_cli.files import save_safetensors_atomic
from livetalk_cli.models.audio import AudioFeatureEncoder, frame_features, samples_per_frame
from livetalk_cli.models.vae import WanVAE
from livetalk_cli.world.clip import WorldClip, WorldConfig, make_clip
from livetalk_cli.world.face import mouth_colour_distance2

log = logging.getLogger(__name__)
SHARD = 64
ANY_VAE = "*"  # `made_by` for latent sets made elsewhere (`world.latents`): any tag, or none


def world_config(cfg: ModelConfig) -> WorldConfig:
    return WorldConfig(height=cfg.height, width=cfg.width, fps=cfg.fps, sample_rate=cfg.audio.sample_rate)


def world_clip(cfg: ModelConfig, seed: int, num_frames: int) -> WorldClip:
    """A world clip whose frame 0 is the reference image (the stream-start convention)."""
    clip = make_clip(seed, num_frames, world_config(cfg))
    clip.frames[0] = clip.reference
    return clip


def video_tensor(frames: np.ndarray) -> Tensor:
    """uint8 (T, H, W, 3) → (3, T, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def mouth_map(video: Tensor) -> Tensor:
    """(B, 3, T, H, W) in [-1, 1] → (B, T, H, W): each pixel's weight in the lip-sync metric's
    mouth-opening count (`metrics.measure_mouth_open`), exp(-d2 / 2), differentiable."""
    return torch.exp(-0.5 * mouth_colour_distance2(((video + 1.0) * 127.5).movedim(1, -1)))


def mouth_region(video: Tensor, spatial_factor: int) -> Tensor:
    """(3, T, H, W) in [-1, 1] → (H/f, W/f) in [0, 1]: where the mouth is on the latent grid — the
    mouth map's maximum over the clip's frames and each f x f cell, grown by one cell so the lips
    and the closed mouth count too. The teacher's loss weights these cells (`mouth_weight`)."""
    peak = mouth_map(video[None]).amax(dim=1, keepdim=True)  # (1, 1, H, W)
    cells = F.max_pool2d(peak, spatial_factor)
    return F.max_pool2d(cells, 3, stride=1, padding=1)[0, 0]


def clip_audio_features(encoder: AudioFeatureEncoder, cfg: ModelConfig, audio: np.ndarray, num_frames: int) -> Tensor:
    """Per-video-frame features of the whole clip, (T, A) float32."""
    spf = samples_per_frame(cfg.audio.sample_rate, cfg.fps)
    return frame_features(encoder, torch.from_numpy(audio), spf, 0, num_frames, 0, 0).float().cpu()


@dataclass
class LatentSet:
    """The encoded training clips, in memory (small for the world: ~60 MB for 1024 clips)."""

    latents: Tensor  # (N, C, F, h, w) fp16
    audio: Tensor  # (N, T, A) fp16
    prompts: list[str]
    mouth: Tensor | None = None  # (N, h, w): `mouth_region` of each clip (world latent sets)
    reference: Tensor | None = None  # (N, C, R, h, w): still-reference latents (`encode_reference`)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, indices: list[int], device: torch.device) -> tuple[Tensor, Tensor, list[str]]:
        """(latents (B,C,F,h,w) fp32, audio features (B,T,A) fp32, prompts)."""
        idx = torch.tensor(indices)
        return (self.latents[idx].float().to(device), self.audio[idx].float().to(device),
                [self.prompts[i] for i in indices])

    def references(self, indices: list[int], device: torch.device) -> Tensor:
        """(B, C, R, h, w) fp32: the reference latents the DiT's `y` is built from — the stored
        still-reference latents, or (single-frame models) latent frame 0, the reference itself."""
        idx = torch.tensor(indices)
        ref = self.reference[idx] if self.reference is not None else self.latents[idx][:, :, :1]
        return ref.float().to(device)

    def loss_weights(self, indices: list[int], mouth_weight: float, device: torch.device) -> Tensor:
        """(B, 1, 1, h, w) per-position loss weights 1 + `mouth_weight` x the mouth region."""
        if self.mouth is None:
            raise UserError("the latent set has no mouth regions (made before they were stored, or not from "
                            "world clips): delete its folder to re-encode it, or set mouth_weight: 0")
        m = self.mouth[torch.tensor(indices)].float().to(device)
        return (1.0 + mouth_weight * m)[:, None, None]


@torch.no_grad()
def encode_world(
    directory: Path,
    cfg: ModelConfig,
    vae: WanVAE,
    encoder: AudioFeatureEncoder,
    *,
    num_clips: int,
    clip_frames: int,
    made_by: str | None = None,
    rank: int = 0,
    world: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Encode clip seeds [0, num_clips) into shards (each rank writes its own shards), tagged
    `made_by`; shards already there with those clips and that tag are kept."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = list(range((num_clips + SHARD - 1) // SHARD))
    device = next(vae.parameters()).device
    for s in shards[rank::world]:
        path = directory / f"shard_{s:05d}.safetensors"
        seeds = list(range(s * SHARD, min((s + 1) * SHARD, num_clips)))
        if _shard_ok(path, len(seeds), made_by):
            if cfg.still_reference_latents and not _has_reference(path):
                _add_references(path, cfg, vae)
            if on_progress:
                on_progress(s + 1, len(shards))
            continue
        if path.is_file():
            log.info("%s: encoding again (%d clips needed, other clips or another VAE)", path, len(seeds))
        lat, aud, mouth, refs, prompts = [], [], [], [], []
        for seed in seeds:
            clip = world_clip(cfg, seed, clip_frames)
            video = video_tensor(clip.frames)
            lat.append(vae.encode(video[None].to(device)).float().cpu())
            aud.append(clip_audio_features(encoder, cfg, clip.audio, clip_frames))
            mouth.append(mouth_region(video, cfg.vae.spatial_factor))
            prompts.append(clip.prompt)
            if cfg.still_reference_latents:
                refs.append(_reference_latents(cfg, vae, clip))
        tensors = {
            "latents": torch.cat(lat).half().contiguous(),
            "audio": torch.stack(aud).half().contiguous(),
            "mouth": torch.stack(mouth).half().contiguous(),
            "index": torch.tensor(seeds),
        }
        if refs:
            tensors["reference"] = torch.cat(refs).half().contiguous()
        _save_shard(path, tensors, _metadata(prompts, made_by))
        if on_progress:
            on_progress(s + 1, len(shards))


def _reference_latents(cfg: ModelConfig, vae: WanVAE, clip: WorldClip) -> Tensor:
    image = video_tensor(clip.reference[None])[None].to(next(vae.parameters()).device)
    return vae.encode_reference(image, cfg.still_reference_latents).float().cpu()


def _metadata(prompts: list[str], made_by: str | None) -> dict[str, str]:
    return {"prompts": json.dumps(prompts), **({"vae": made_by} if made_by is not None else {})}


def _save_shard(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    save_safetensors_atomic(tensors, path, metadata=metadata)


def shard_header(path: Path) -> tuple[int, dict[str, str]] | None:
    """(the shard's rows, its metadata), or None when there is no such shard."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        key = "index" if "index" in f.keys() else "latents"
        return f.get_slice(key).get_shape()[0], f.metadata() or {}


def _shard_ok(path: Path, rows: int, made_by: str | None) -> bool:
    header = shard_header(path)
    return header is not None and header[0] >= rows and made_by in (ANY_VAE, header[1].get("vae"))


def _has_reference(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return "reference" in f.keys()


def _add_references(path: Path, cfg: ModelConfig, vae: WanVAE) -> None:
    """Give an existing shard the reference latents a still-reference model needs (only the
    reference images are encoded; the clips' latents stay as they are)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    seeds = tensors["index"].tolist()
    refs = [_reference_latents(cfg, vae, make_clip(seed, 1, world_config(cfg))) for seed in seeds]
    tensors["reference"] = torch.cat(refs).half().contiguous()
    _save_shard(path, tensors, metadata)


def load_latents(directory: Path, num_clips: int) -> LatentSet:
    """Clips [0, num_clips) of the latent set in `directory` (its shards may hold more)."""
    from safetensors import safe_open

    lat, aud, mouth, refs, prompts = [], [], [], [], []
    for s in range((num_clips + SHARD - 1) // SHARD):
        path = directory / f"shard_{s:05d}.safetensors"
        if not path.is_file():
            raise UserError(f"{path} not found: the latent set holds fewer than the {num_clips} clips needed")
        t = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            prompts += json.loads(f.metadata()["prompts"])
        lat.append(t["latents"])
        aud.append(t["audio"])
        mouth.append(t.get("mouth"))
        refs.append(t.get("reference"))
    regions = torch.cat(mouth)[:num_clips] if all(m is not None for m in mouth) else None
    reference = torch.cat(refs)[:num_clips] if all(r is not None for r in refs) else None
    data = LatentSet(torch.cat(lat)[:num_clips], torch.cat(aud)[:num_clips], prompts[:num_clips], regions, reference)
    if len(data) < num_clips:
        raise UserError(f"{directory}: the latent set holds {len(data)} clips, {num_clips} needed")
    return data


def latents_ready(directory: Path, num_clips: int, *, reference: bool = False, made_by: str | None = None) -> int:
    """How many of clips [0, num_clips) the set holds in whole shards (with `reference`: holding the
    still-reference latents; tagged `made_by`, a VAE id, or untagged for None, or anything for ANY_VAE)."""
    ready = 0
    for s in range((num_clips + SHARD - 1) // SHARD):
        path = directory / f"shard_{s:05d}.safetensors"
        rows = min(SHARD, num_clips - s * SHARD)
        if _shard_ok(path, rows, made_by) and (not reference or _has_reference(path)):
            ready += rows
    return ready


def latents_complete(directory: Path, num_clips: int, *, reference: bool = False, made_by: str | None = None) -> bool:
    """Every clip of [0, num_clips) is there (see `latents_ready`)."""
    return latents_ready(directory, num_clips, reference=reference, made_by=made_by) == num_clips
