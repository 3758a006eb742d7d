"""Audio → per-video-frame features, and the windowing that makes them streamable.

Video frame i (at the preset's fps) spans samples [i*spf, (i+1)*spf), spf = sample_rate / fps
(1000 at 16 kHz / 16 fps). Every encoder maps a segment of 16 kHz mono audio covering N frames
(plus `margin` samples on each side) to N feature vectors:

- `LogMelEncoder`: built-in log-mel features, no weights (small presets). Exact per frame given
  `margin` samples around the span, so block-wise streaming equals one-shot computation.
- `Wav2Vec2Encoder`: OmniAvatar's features through `transformers`, from a local directory only:
  CNN features interpolated to the frame count, then the transformer; last hidden state
  concatenated with all hidden states (14 x 768 = 10752 for wav2vec2-base).
- `RandomAudioStandIn`: log-mel features through a fixed seeded random projection to the preset's
  width. A stand-in for `--random-weights` runs of real-size presets, NOT a real audio encoder.

`frame_features` runs any encoder over a window (context before, look-ahead after) of a waveform
that may still be arriving, zero-padding outside it.

Legend: N video frames, M = N*k mel frames, D features per video frame, C CNN channels,
T CNN time steps, H hidden size.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from livetalk_cli.config import AudioConfig, ModelConfig
from livetalk_cli.errors import CheckpointError, UserError

log = logging.getLogger(__name__)

# Fixed affine normalisation of log(mel + 1e-5): (log_mel - LOG_MEL_CENTER) / LOG_MEL_SCALE.
# Silence (log 1e-5 = -11.5) maps to -1; speech peaking at 0.3 full scale tops out near +1.
LOG_MEL_FLOOR = 1e-5
LOG_MEL_CENTER = -3.0
LOG_MEL_SCALE = 8.5
STAND_IN_SEED = 1234  # seed of RandomAudioStandIn's projection


class AudioFeatureEncoder(Protocol):
    """Maps a segment of 16 kHz mono audio to one feature vector per video frame."""

    feature_dim: int
    margin: int  # samples needed before and after the frames' span for exact features (may be 0)

    def encode(self, segment: Tensor, num_frames: int) -> Tensor:
        """segment: float32 (margin + num_frames*spf + margin,) → (num_frames, feature_dim)
        float32 on the encoder's device."""
        ...


def samples_per_frame(sample_rate: int, fps: int) -> int:
    """Audio samples per video frame; they must divide exactly (1000 at 16 kHz / 16 fps)."""
    if fps <= 0 or sample_rate % fps:
        raise UserError(
            f"audio sample rate {sample_rate} Hz is not a whole number of samples per video frame "
            f"at {fps} fps; choose an fps that divides {sample_rate}"
        )
    return sample_rate // fps


def _check_segment(segment: Tensor, num_frames: int, spf: int, margin: int) -> None:
    expected = num_frames * spf + 2 * margin
    if segment.ndim != 1 or segment.shape[0] != expected:
        raise ValueError(
            f"audio segment must be 1-D with {expected} samples for {num_frames} frames "
            f"(spf {spf}, margin {margin}), got shape {tuple(segment.shape)}"
        )


# --- log-mel -----------------------------------------------------------------------------


def _hz_to_mel(f: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 20.0,
                   f_max: float = 7600.0) -> Tensor:
    """HTK-scale triangular filters, peak 1 (no area normalisation): (n_fft//2 + 1, n_mels) fp32."""
    f_max = min(f_max, sample_rate / 2)
    edges = _mel_to_hz(torch.linspace(_hz_to_mel(torch.tensor(f_min, dtype=torch.float64)).item(),
                                      _hz_to_mel(torch.tensor(f_max, dtype=torch.float64)).item(),
                                      n_mels + 2, dtype=torch.float64))  # (n_mels + 2,)
    bins = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft  # (n_fft/2+1,)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]  # (n_mels,) each
    rise = (bins[:, None] - lo) / (mid - lo)
    fall = (hi - bins[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(rise, fall), min=0.0).float()


class LogMelEncoder:
    """Built-in log-mel features, k mel frames per video frame, no weights.

    hop = spf / k (250 at 16 fps, k = 4), 400-sample (25 ms) periodic Hann window inside an
    n_fft = 512 frame, power spectrum, `n_mels` HTK mel bands (20 Hz .. 7.6 kHz),
    log(mel + 1e-5), then a fixed affine map to roughly [-1, 1] for speech. Mel frame j of video
    frame i is centred at sample i*spf + floor((j + 0.5)*hop). Features are laid out as (k, n_mels)
    flattened time-major: feature_dim = k * n_mels. margin = n_fft // 2.
    """

    n_fft = 512
    win_length = 400

    def __init__(self, cfg: AudioConfig, fps: int, device: torch.device | str = "cpu"):
        self.spf = samples_per_frame(cfg.sample_rate, fps)
        self.k = cfg.mel_frames_per_video_frame
        if self.k < 1 or self.spf % self.k:
            raise UserError(
                f"audio: {self.spf} samples per video frame cannot be split into "
                f"{self.k} equal mel hops (mel_frames_per_video_frame)"
            )
        self.hop = self.spf // self.k
        self.n_mels = cfg.n_mels
        self.feature_dim = self.n_mels * self.k
        self.margin = self.n_fft // 2
        self.device = torch.device(device)
        pad = (self.n_fft - self.win_length) // 2
        window = F.pad(torch.hann_window(self.win_length, periodic=True), (pad, pad))  # (n_fft,)
        self.window = window.to(self.device)
        self.fbank = mel_filterbank(self.n_fft, self.n_mels, cfg.sample_rate).to(self.device)

    def encode(self, segment: Tensor, num_frames: int) -> Tensor:
        """segment: (margin + N*spf + margin,) → (N, k*n_mels) float32."""
        _check_segment(segment, num_frames, self.spf, self.margin)
        x = segment.to(self.device, torch.float32)
        # Frame m (= i*k + j) is centred at margin + hop//2 + m*hop and starts n_fft//2 before it.
        start = self.margin + self.hop // 2 - self.n_fft // 2
        frames = x[start:].unfold(0, self.n_fft, self.hop)[: num_frames * self.k]  # (M, n_fft)
        spec = torch.fft.rfft(frames * self.window, dim=-1)  # (M, n_fft/2 + 1)
        power = spec.real.square() + spec.imag.square()
        mel = power @ self.fbank  # (M, n_mels)
        feats = (torch.log(mel + LOG_MEL_FLOOR) - LOG_MEL_CENTER) / LOG_MEL_SCALE
        return feats.reshape(num_frames, self.feature_dim)  # (N, k*n_mels), time-major


class RandomAudioStandIn:
    """Log-mel features through a fixed, seeded random projection to `out_dim` (e.g. 10752).

    Only a stand-in so that `--random-weights` runs of real-size presets (which expect wav2vec2
    features) have audio features of the right width that still follow the audio. It is NOT a
    real encoder: a checkpoint trained on wav2vec2 features gives nonsense with it.
    """

    def __init__(self, cfg: AudioConfig, fps: int, out_dim: int, device: torch.device | str = "cpu",
                 seed: int = STAND_IN_SEED):
        self.mel = LogMelEncoder(cfg, fps, device)
        self.feature_dim = out_dim
        self.margin = self.mel.margin
        gen = torch.Generator().manual_seed(seed)
        proj = torch.randn(self.mel.feature_dim, out_dim, generator=gen) / math.sqrt(self.mel.feature_dim)
        self.proj = proj.to(self.mel.device)  # (k*n_mels, out_dim)

    def encode(self, segment: Tensor, num_frames: int) -> Tensor:
        """segment: (margin + N*spf + margin,) → (N, out_dim) float32."""
        return self.mel.encode(segment, num_frames) @ self.proj


# --- wav2vec2 ----------------------------------------------------------------------------


class Wav2Vec2Encoder:
    """OmniAvatar's audio features from a local `transformers` wav2vec2 directory.

    encode: normalise the segment to zero mean / unit variance (as Wav2Vec2FeatureExtractor with
    do_normalize), run the CNN feature extractor, linearly interpolate its features in time to the
    frame count (align_corners=True), then the feature projection and the transformer encoder.
    Output = cat([last_hidden_state, *hidden_states], -1) where hidden_states are the input of
    layer 0 and the output of every layer: (N, (num_hidden_layers + 2) * hidden_size),
    14 * 768 = 10752 for wav2vec2-base. margin = 0 (the transformer sees the whole segment, so
    features depend on the window: see `frame_features`). frame_grid "start" (`AudioConfig`): only
    the segment's first (N-1) frames of audio are encoded and spread over the N frames.
    """

    def __init__(self, model_dir: Path, fps: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, sample_rate: int = 16000, frame_grid: str = "span"):
        model_dir = Path(model_dir)
        config_file = model_dir / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"wav2vec2: {model_dir} is not a model directory (no config.json)")
        from transformers import AutoConfig, Wav2Vec2Model

        try:
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"wav2vec2: cannot read {config_file}: {e}") from None
        if config.model_type != "wav2vec2":
            raise CheckpointError(
                f"wav2vec2: {model_dir} holds a {config.model_type!r} model, not wav2vec2"
            )
        try:
            model = Wav2Vec2Model.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"wav2vec2: cannot load weights from {model_dir}: {e}") from None
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.spf = samples_per_frame(sample_rate, fps)
        self.margin = 0
        if frame_grid not in ("span", "start"):
            raise ValueError(f"frame_grid must be 'span' or 'start', got {frame_grid!r}")
        self.frame_grid = frame_grid
        self.num_layers = config.num_hidden_layers
        self.feature_dim = (config.num_hidden_layers + 2) * config.hidden_size
        log.info("wav2vec2 from %s: %d layers x %d → %d features per frame",
                 model_dir, config.num_hidden_layers, config.hidden_size, self.feature_dim)

    @torch.no_grad()  # not inference_mode: the features may feed a training graph
    def encode(self, segment: Tensor, num_frames: int) -> Tensor:
        """segment: (N*spf,) → (N, (num_hidden_layers + 2) * hidden_size) float32."""
        _check_segment(segment, num_frames, self.spf, self.margin)
        x = segment.to(self.device, torch.float32)
        if self.frame_grid == "start" and num_frames > 1:
            x = x[: (num_frames - 1) * self.spf]  # (N-1)/fps seconds spread over N frames
        x = (x - x.mean()) / torch.sqrt(x.var(correction=0) + 1e-7)  # do_normalize
        feats = self.model.feature_extractor(x[None].to(self.dtype))  # (1, C, T)
        feats = F.interpolate(feats, size=num_frames, mode="linear", align_corners=True)  # (1, C, N)
        hidden, _ = self.model.feature_projection(feats.transpose(1, 2))  # (1, N, H)
        states, last = self._run_encoder(hidden)
        out = torch.cat([last, *states], dim=-1)  # (1, N, (L + 2) * H)
        return out[0].float()

    def _run_encoder(self, hidden: Tensor) -> tuple[list[Tensor], Tensor]:
        """Transformer encoder with its hidden states recorded by hooks (layer 0 input, then every
        layer's output), independent of how the installed transformers version reports them."""
        states: list[Tensor] = []
        layers = self.model.encoder.layers

        def take_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            states.append(args[0] if args else kwargs["hidden_states"])

        def take_output(module: torch.nn.Module, args: tuple, output: object) -> None:
            states.append(output[0] if isinstance(output, tuple) else output)

        handles = [layers[0].register_forward_pre_hook(take_input, with_kwargs=True)]
        handles += [layer.register_forward_hook(take_output) for layer in layers]
        try:
            last = self.model.encoder(hidden).last_hidden_state  # (1, N, H)
        finally:
            for h in handles:
                h.remove()
        if len(states) != self.num_layers + 1:  # layerdrop or a changed layer API
            raise RuntimeError(f"wav2vec2: recorded {len(states)} hidden states, "
                               f"expected {self.num_layers + 1}")
        return states, last


# --- windowing and construction ----------------------------------------------------------


def window_frames(cfg: AudioConfig, fps: int) -> tuple[int, int]:
    """(context_frames, lookahead_frames) for `frame_features` from the config's seconds, rounded up."""
    return math.ceil(cfg.context_s * fps - 1e-9), math.ceil(cfg.lookahead_s * fps - 1e-9)


def frame_features(encoder: AudioFeatureEncoder, wave: Tensor, spf: int, frame_start: int, num_frames: int,
                   context_frames: int, lookahead_frames: int, wave_start: int = 0) -> Tensor:
    """Features of video frames [frame_start, frame_start + num_frames).

    wave: (S,) 16 kHz samples [wave_start, wave_start + S) of the stream (sample 0 = start of frame
    0): the whole waveform, or what a bounded live buffer still holds. The encoder runs over frames
    [frame_start - context_frames, frame_start + num_frames + lookahead_frames) plus its margin on
    each side; samples before 0 or not received yet are zeros. Returns (num_frames, D) float32 on
    the encoder's device.
    """
    if num_frames < 1 or context_frames < 0 or lookahead_frames < 0:
        raise ValueError("frame_features: num_frames >= 1, context/lookahead >= 0 required")
    total = context_frames + num_frames + lookahead_frames
    first, end = audio_window_samples(encoder, spf, frame_start, num_frames, context_frames, lookahead_frames)
    length = end - first
    if max(first, 0) < wave_start:
        raise ValueError(f"frame_features: samples from {first} needed, the buffer starts at {wave_start}")
    segment = torch.zeros(length, dtype=torch.float32, device=wave.device)
    lo, hi = max(first, 0), min(first + length, wave_start + wave.shape[0])
    if hi > lo:
        segment[lo - first: hi - first] = wave[lo - wave_start: hi - wave_start].to(torch.float32)
    feats = encoder.encode(segment, total)  # (total, D)
    return feats[context_frames: context_frames + num_frames]


def audio_window_samples(encoder: AudioFeatureEncoder, spf: int, frame_start: int, num_frames: int,
                         context_frames: int, lookahead_frames: int) -> tuple[int, int]:
    """Samples [first, end) that `frame_features` reads for these frames (before clipping to 0)."""
    first = (frame_start - context_frames) * spf - encoder.margin
    return first, first + (context_frames + num_frames + lookahead_frames) * spf + 2 * encoder.margin


def build_audio_encoder(cfg: ModelConfig, *, model_dir: Path | None, random_weights: bool,
                        device: torch.device | str = "cpu") -> AudioFeatureEncoder:
    """The preset's audio encoder.

    logmel → `LogMelEncoder`. wav2vec2 → `Wav2Vec2Encoder(model_dir)` when a directory is given
    (even with random_weights), else with random_weights a `RandomAudioStandIn` of the preset's
    audio width; neither is a `UserError`.
    """
    if cfg.audio.encoder == "logmel":
        return LogMelEncoder(cfg.audio, cfg.fps, device)
    if cfg.audio.encoder != "wav2vec2":
        raise UserError(f"unknown audio encoder {cfg.audio.encoder!r}")
    if model_dir is not None:
        enc = Wav2Vec2Encoder(model_dir, cfg.fps, device, sample_rate=cfg.audio.sample_rate,
                              frame_grid=cfg.audio.frame_grid)
        if cfg.dit.audio_dim is not None and enc.feature_dim != cfg.dit.audio_dim:
            raise CheckpointError(
                f"wav2vec2 in {model_dir} gives {enc.feature_dim} features per frame, "
                f"preset {cfg.name!r} expects {cfg.dit.audio_dim}"
            )
        return enc
    if random_weights:
        log.warning("audio: random stand-in features for %r (log-mel + random projection), "
                    "not wav2vec2", cfg.name)
        return RandomAudioStandIn(cfg.audio, cfg.fps, cfg.audio_feature_dim, device)
    raise UserError(
        f"preset {cfg.name!r} needs wav2vec2 audio features: pass a --checkpoint that includes a "
        "local wav2vec2-base-960h directory, or --random-weights for a stand-in"
    )
