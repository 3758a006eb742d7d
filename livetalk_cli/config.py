"""Typed model configuration and the presets named after checkpoints.

Every shape in the toolkit derives from a `ModelConfig`. Presets are plain constructors;
`ModelConfig.from_dict` / `to_dict` are the one place a config is read from or written to
JSON (checkpoint folders store one as `config.json`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from livetalk_cli.errors import UserError

# Wan2.1 VAE latent normalisation constants (per channel), REFERENCE §3.
WAN_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class DiTConfig:
    """Wan2.1 DiT dimensions plus OmniAvatar's audio/reference conditioning."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int  # 16 for T2V; 2 * out_dim + 1 = 33 with the reference latent + mask
    out_dim: int
    text_dim: int
    text_len: int
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    audio_dim: int | None = None  # features per video frame; None = no audio conditioning
    audio_hidden: int = 32  # AudioPack output width
    audio_pack_frames: int = 4  # video frames packed into one latent frame
    # Which latent positions `y` gives the reference latent. "every": each position its reference
    # latent (OmniAvatar); "first": latent frame 0 only, zeros (mask 1) after it (Wan I2V's layout):
    # past the first block only the KV cache can carry the identity, so identity sinks matter.
    reference_positions: Literal["every", "first"] = "every"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_reference(self) -> bool:
        """OmniAvatar layout: [noisy latent | reference latent | mask] on the channel axis."""
        return self.in_dim == 2 * self.out_dim + 1

    @property
    def has_audio(self) -> bool:
        return self.audio_dim is not None

    @property
    def num_audio_layers(self) -> int:
        """OmniAvatar adds an audio projection before 0-indexed blocks 2 .. num_layers // 2."""
        return self.num_layers // 2 - 1 if self.has_audio else 0

    def rope_bands(self) -> tuple[int, int, int]:
        """Real dims of the (t, h, w) RoPE bands: 44/42/42 for head_dim 128."""
        d = self.head_dim
        hw = 2 * (d // 6)
        return d - 2 * hw, hw, hw


@dataclass(frozen=True, kw_only=True, slots=True)
class VAEConfig:
    """Wan-VAE (causal 3D) dimensions; 8x spatial and 4x temporal compression."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN_LATENT_STD

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


@dataclass(frozen=True, kw_only=True, slots=True)
class AudioConfig:
    """How audio becomes per-video-frame features.

    `logmel`: built-in log-mel features, no external weights (small presets).
    `wav2vec2`: OmniAvatar's features through `transformers` from a local directory
    (last hidden state + all hidden states, 14 x 768 = 10752 per video frame).
    """

    encoder: Literal["logmel", "wav2vec2"] = "logmel"
    sample_rate: int = 16000
    n_mels: int = 32
    mel_frames_per_video_frame: int = 4
    context_s: float = 0.5  # audio before a block's first frame given to the encoder
    lookahead_s: float = 0.0  # audio after a block's last frame given to the encoder
    # wav2vec2 only: how N frames' features sit in time. "span": the CNN features of N/fps seconds
    # are interpolated to N points; "start": of (N-1)/fps seconds, so frame k's feature sits at
    # k/fps — OmniAvatar's and LiveTalk's grid (their frames would sit 16-62 ms later on "span").
    frame_grid: Literal["span", "start"] = "span"


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamConfig:
    """The causal block sampler: block size, steps, identity sinks and the ring window.

    Counts are latent frames. A block's passes attend over `sink_frames + window_frames +
    block_frames` frames once the cache is full: the identity sinks (the stream's first frames,
    never evicted), the `window_frames` most recent frames before the block, and the block itself.
    The defaults are LiveTalk's inference (Self Forcing's `local_attn_size: 15` counts the current
    block): 9 sinks + 3 recent + 3 current = 15 frames, keys at absolute temporal positions.
    `relative_rope=True` numbers the attended frames 0..n-1 instead (sinks, then the window oldest
    to newest, then the block), so a stream can outrun the positions a checkpoint was trained on
    (Wan's RoPE table covers 1024 latent positions, ~256 s at 16 fps); an upstream checkpoint then
    sees positions it was not trained with from the first eviction on.
    """

    block_frames: int = 3  # latent frames per block
    num_steps: int = 4
    shift: float = 5.0
    sink_frames: int = 9  # latent frames pinned as identity sinks (AHIS); 0 = none
    window_frames: int = 3  # most recent latent frames kept in the ring (the current block not counted)
    relative_rope: bool = False  # True: positions 0..n-1 within the attended frames (unbounded streams)
    # The VAE's identity anchor: every `vae_anchor_every` blocks (0 = never) the causal decoder's
    # cache is rebuilt from the stream's first latent (the reference) and its last
    # `vae_anchor_history` latents. For VAEs whose later latents only code what changed (the
    # demo's: its decoder loses the background and skin tone once the first latent leaves its
    # ~100-frame receptive field); Wan's own VAE does not need it.
    vae_anchor_every: int = 0
    vae_anchor_history: int = 2
    # Latents over which an anchor cross-fades from the decoder's un-anchored continuation (0 = a
    # cut). The demo drifts ~35/255 between anchors: a cut is a colour flash, a one-block fade is
    # under the stream's own frame differences; each faded latent is decoded twice.
    vae_anchor_fade: int = 3
    # The state an anchor restarts the decoder from: after the reference's first N still latents
    # (the reference image held still; `still_reference_latents` >= N), not after the reference
    # latent alone (N = 1). The decoder's steady frames then follow a steady past of the reference.
    vae_anchor_still: int = 1
    # Frame 0 (the pinned reference latent) decoded through the decoder's steady path: the last
    # frame of the reference's second still latent (`still_reference_latents` >= 2) decoded after
    # the reference latent, instead of the decoder's one-frame path. The demo VAE's one-frame path
    # is its weakest (identity error 0.35 vs 0.16 for later frames on held-out world clips), so its
    # frame 0 looked washed out and tinted beside frame 1.
    settled_first_frame: bool = False

    def validate(self) -> None:
        if self.block_frames < 1 or self.num_steps < 1:
            raise UserError("stream: block_frames and num_steps must be >= 1")
        if self.vae_anchor_every < 0 or self.vae_anchor_history < 0 or self.vae_anchor_fade < 0:
            raise UserError("stream: vae_anchor_every, vae_anchor_history and vae_anchor_fade must be >= 0")
        if self.vae_anchor_still < 1:
            raise UserError("stream: vae_anchor_still must be >= 1 (1 = the reference latent alone)")
        if self.sink_frames < 0 or self.window_frames < 0:
            raise UserError("stream: sink_frames and window_frames must be >= 0")
        if self.sink_frames % self.block_frames or self.window_frames % self.block_frames:
            raise UserError(
                "stream: sink_frames and window_frames must be multiples of block_frames "
                f"({self.block_frames})"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """A complete model: DiT, VAE, encoders, sampler settings, resolution and fps."""

    name: str
    dit: DiTConfig
    vae: VAEConfig
    audio: AudioConfig = field(default_factory=AudioConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    text_encoder: Literal["builtin", "umt5"] = "builtin"
    text_vocab: int = 4096  # built-in hashed-word vocabulary
    height: int = 64
    width: int = 64
    fps: int = 16
    # How the reference image becomes the DiT's `y`. 0: its single-frame latent at every latent
    # position (Wan I2V / OmniAvatar). N > 0: the reference encoded as a still video, one latent
    # per position, position j >= N using latent N - 1. A small causal VAE's latents depend on
    # their position until its encoder state settles (the demo's: ~12 latents), so only the still
    # video's latents line up with the frames to generate (measured on the demo VAE: mean squared
    # distance to the clip's latents 0.07-0.13 vs 2.7 for the single-frame latent).
    still_reference_latents: int = 0

    @property
    def latent_hw(self) -> tuple[int, int]:
        f = self.vae.spatial_factor
        return self.height // f, self.width // f

    @property
    def tokens_per_frame(self) -> int:
        h, w = self.latent_hw
        _, ph, pw = self.dit.patch_size
        return (h // ph) * (w // pw)

    @property
    def audio_feature_dim(self) -> int:
        if self.dit.audio_dim is None:
            raise UserError(f"preset {self.name!r} has no audio conditioning")
        return self.dit.audio_dim

    def validate(self) -> None:
        self.stream.validate()
        if self.still_reference_latents < 0:
            raise UserError("still_reference_latents must be >= 0")
        if self.dit.reference_positions not in ("every", "first"):
            raise UserError(f"dit.reference_positions must be 'every' or 'first', not {self.dit.reference_positions!r}")
        if self.stream.settled_first_frame and self.still_reference_latents < 2:
            raise UserError("stream.settled_first_frame needs still_reference_latents >= 2 (it decodes the second)")
        if self.stream.vae_anchor_still > max(1, self.still_reference_latents):
            raise UserError(f"stream.vae_anchor_still {self.stream.vae_anchor_still} needs still_reference_latents "
                            f">= {self.stream.vae_anchor_still}")
        f = self.vae.spatial_factor * self.dit.patch_size[1]
        if self.height % f or self.width % f:
            raise UserError(f"resolution {self.height}x{self.width} must be a multiple of {f}")
        if self.vae.z_dim != self.dit.out_dim:
            raise UserError("vae.z_dim must equal dit.out_dim")
        if len(self.vae.latent_mean) != self.vae.z_dim or len(self.vae.latent_std) != self.vae.z_dim:
            raise UserError("vae latent_mean/latent_std need one value per latent channel")
        if self.dit.dim % self.dit.num_heads:
            raise UserError("dit.dim must be divisible by dit.num_heads")
        if self.audio.encoder == "logmel" and self.dit.audio_dim is not None:
            expected = self.audio.n_mels * self.audio.mel_frames_per_video_frame
            if self.dit.audio_dim != expected:
                raise UserError(
                    f"logmel audio gives {expected} features per frame, dit.audio_dim is {self.dit.audio_dim}"
                )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # --- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from JSON data; unknown keys and bad values are one clear error."""
        try:
            data = dict(data)
            sub = {
                "dit": DiTConfig,
                "vae": VAEConfig,
                "audio": AudioConfig,
                "stream": StreamConfig,
            }
            kwargs: dict[str, Any] = {}
            for key, value in data.items():
                if key in sub:
                    kwargs[key] = _build(sub[key], value, key)
                elif key in {f.name for f in dataclasses.fields(cls)}:
                    kwargs[key] = value
                else:
                    raise UserError(f"config: unknown key {key!r}")
            cfg = cls(**kwargs)
        except TypeError as e:
            raise UserError(f"config: {e}") from None
        cfg.validate()
        return cfg


def _build(kind: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise UserError(f"config: {where} must be a mapping")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise UserError(f"config: unknown key(s) in {where}: {', '.join(unknown)}")
    value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return kind(**value)


# --- presets ---------------------------------------------------------------------------


def _tiny() -> ModelConfig:
    audio = AudioConfig(encoder="logmel", n_mels=16, mel_frames_per_video_frame=4)
    return ModelConfig(
        name="tiny",
        dit=DiTConfig(
            dim=64, ffn_dim=128, num_heads=2, num_layers=4, in_dim=9, out_dim=4,
            text_dim=32, text_len=8, freq_dim=32, audio_dim=64, audio_hidden=16,
        ),
        vae=VAEConfig(
            dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
            latent_mean=(0.0,) * 4, latent_std=(1.0,) * 4,
        ),
        audio=audio,
        stream=StreamConfig(block_frames=3, sink_frames=3, window_frames=6, relative_rope=True),
        text_vocab=512,
        height=64, width=64, fps=16,
        still_reference_latents=4,  # as the demo: 6-latent test clips see it change, then settle
    )


def _demo() -> ModelConfig:
    """The embedded default: trained by `recipes/demo` on the synthetic world (96x96, 16 fps).

    Sized for a 2-core CPU: the VAE decoder (8 channels at full resolution) decodes ~100 frames/s
    and the DiT step is a few ms per pass, so rendering runs well above real time. The latent
    mean/std here are placeholders; the trained checkpoint's config carries the measured ones.
    """
    audio = AudioConfig(encoder="logmel", n_mels=16, mel_frames_per_video_frame=4, context_s=0.5)
    return ModelConfig(
        name="demo",
        dit=DiTConfig(
            dim=128, ffn_dim=512, num_heads=4, num_layers=8, in_dim=33, out_dim=16,
            text_dim=64, text_len=16, freq_dim=64, audio_dim=64, audio_hidden=32,
        ),
        vae=VAEConfig(
            dim=8, z_dim=16, dim_mult=(1, 2, 4, 8), num_res_blocks=1,
            latent_mean=(0.0,) * 16, latent_std=(1.0,) * 16,
        ),
        audio=audio,
        # the VAE re-anchored every block: over 60-s streams (8 held-out identities) lip-sync per 10-s
        # window 0.37-0.41 -> 0.42-0.50 and identity error 0.35 -> 0.31 against every 3 blocks, at 2.6x
        # real time instead of 4.1x on 2 cores. History 0 (each block decoded after the reference
        # latent alone, faded in from the decoder's continuation): the decoder's error grows with its
        # distance from the reference, so replaying 2 latents left it further off. 40-s streams of 6
        # held-out identities, history 2 -> 0: identity error 0.262 -> 0.239, drift 0.038 -> 0.021
        # per minute, flicker 3.85 -> 3.75, lip-sync 0.427 -> 0.439; on 48 validation 2-s clips
        # lip-sync 0.517 -> 0.535, identity error 0.191 -> 0.200; 2 fewer latent decodes a block
        # The anchor's state after one still block of the reference (vae_anchor_still 3), not the
        # reference latent alone: 40-s streams of 6 held-out identities, 1 -> 3: identity error
        # 0.207-0.215 -> 0.157-0.158 per 10-s window, drift +0.016 -> +0.001 per minute, lip-sync
        # 0.478 -> 0.480, flicker 2.2 both (2: 0.166-0.170; 4: 0.180; 6: 0.225-0.231); 48 validation
        # 2-s clips: identity error -0.022 +- 0.007, lip-sync -0.002 +- 0.021
        stream=StreamConfig(block_frames=3, sink_frames=3, window_frames=3, relative_rope=True, vae_anchor_every=1,
                            vae_anchor_history=0, vae_anchor_still=3, settled_first_frame=True),
        text_vocab=1024,
        height=96, width=96, fps=16,
        still_reference_latents=12,
    )


def _wan_1_3b_dit(**kw: Any) -> DiTConfig:
    base = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16,
                text_dim=4096, text_len=512)
    base.update(kw)
    return DiTConfig(**base)


def _omniavatar_audio() -> AudioConfig:
    return AudioConfig(encoder="wav2vec2", context_s=1.0, lookahead_s=0.25, frame_grid="start")


# LiveTalk's inference (configs/causal_inference.yaml): 15 latent frames including the block being
# denoised, the first 9 (3 blocks, the reference frame's included) pinned as sinks, absolute positions.
_LIVETALK_STREAM = StreamConfig(block_frames=3, num_steps=4, shift=5.0, sink_frames=9,
                                window_frames=3, relative_rope=False)

PRESETS: dict[str, Any] = {
    "tiny": _tiny,
    "demo": _demo,
    "wan2.1-t2v-1.3b": lambda: ModelConfig(
        name="wan2.1-t2v-1.3b", dit=_wan_1_3b_dit(), vae=VAEConfig(),
        text_encoder="umt5", height=480, width=832, fps=16,
        stream=_LIVETALK_STREAM,
    ),
    "omniavatar-1.3b": lambda: ModelConfig(
        name="omniavatar-1.3b", dit=_wan_1_3b_dit(in_dim=33, audio_dim=10752), vae=VAEConfig(),
        audio=_omniavatar_audio(), text_encoder="umt5", height=512, width=512, fps=16,
        stream=_LIVETALK_STREAM,
    ),
    "omniavatar-14b": lambda: ModelConfig(
        name="omniavatar-14b",
        dit=DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=33, out_dim=16,
                      text_dim=4096, text_len=512, audio_dim=10752),
        vae=VAEConfig(), audio=_omniavatar_audio(), text_encoder="umt5",
        height=512, width=512, fps=16, stream=_LIVETALK_STREAM,
    ),
}


def preset(name: str) -> ModelConfig:
    """The named preset; an unknown name is a one-line error listing the choices."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg: ModelConfig = PRESETS[name]()
    cfg.validate()
    return cfg


def video_frames_for_latents(num_latent: int, temporal_factor: int = 4) -> int:
    """Wan VAE: the first latent frame decodes to 1 frame, every later one to `temporal_factor`."""
    return 1 + temporal_factor * (num_latent - 1) if num_latent > 0 else 0


def latents_for_video_frames(num_frames: int, temporal_factor: int = 4) -> int:
    """Fewest latent frames whose decode covers `num_frames` video frames."""
    return 1 + math.ceil(max(num_frames - 1, 0) / temporal_factor)
