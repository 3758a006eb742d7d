"""Deterministic talking-head clips: speech, the mouth it drives, blinks, head motion, frames.

Truth by construction: mouth_open[t] is a zero-lag function of the audio envelope at frame t
(a symmetric 3-tap smoothing, which shifts nothing), and the mouth width follows the spectral
shape of the same audio window, so vowels with a high second formant spread the lips.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from livetalk_cli.world.face import (
    Attributes,
    Identity,
    prompt_for,
    reference_image,
    render_frames,
    sample_attributes,
    sample_identity,
)
from livetalk_cli.world.speech import synth_speech

# The envelope maps frame power in dBFS linearly from [ENVELOPE_FLOOR_DB, ENVELOPE_CEIL_DB] to [0, 1].
ENVELOPE_FLOOR_DB = -50.0
ENVELOPE_CEIL_DB = -14.0
# mouth_wide maps the log spectral centroid of 800-3000 Hz linearly from [WIDE_LO_HZ, WIDE_HI_HZ] to [0, 1].
WIDE_LO_HZ, WIDE_HI_HZ = 1100.0, 2200.0


@dataclass(frozen=True)
class WorldConfig:
    height: int = 96
    width: int = 96
    fps: int = 16
    sample_rate: int = 16000

    @property
    def samples_per_frame(self) -> int:
        if self.sample_rate % self.fps:
            raise ValueError(f"sample_rate {self.sample_rate} must be a multiple of fps {self.fps}")
        return self.sample_rate // self.fps


@dataclass
class WorldClip:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    audio: np.ndarray  # float32 (T * samples_per_frame,)
    reference: np.ndarray  # uint8 (H, W, 3): neutral portrait of the identity
    prompt: str
    identity: Identity
    attributes: Attributes
    mouth_open: np.ndarray  # float32 (T,): the truth that drove the mouth
    mouth_wide: np.ndarray  # float32 (T,)
    envelope: np.ndarray  # float32 (T,): audio_envelope(audio)
    blink: np.ndarray  # float32 (T,)
    head_xy: np.ndarray  # float32 (T, 2)


def frame_bounds(num_samples: int, sample_rate: int, fps: float) -> np.ndarray:
    """Sample index where each video frame's audio window starts, plus the end: (T + 1,) int.

    Frame t covers samples [round(t * sample_rate / fps), round((t + 1) * sample_rate / fps));
    with sample_rate a multiple of fps that is exactly [t * spf, (t + 1) * spf). T is the number of
    whole frames the audio covers.
    """
    if fps <= 0 or sample_rate <= 0:
        raise ValueError(f"fps and sample_rate must be positive, got {fps}, {sample_rate}")
    spf = sample_rate / fps
    t = int(np.floor(num_samples / spf + 1e-9))
    return np.round(np.arange(t + 1) * spf).astype(np.int64)


def _frame_windows(audio: np.ndarray, sample_rate: int, fps: float) -> list[np.ndarray]:
    bounds = frame_bounds(audio.size, sample_rate, fps)
    return [audio[bounds[i]: bounds[i + 1]] for i in range(bounds.size - 1)]


def audio_envelope(audio: np.ndarray, sample_rate: int, fps: float) -> np.ndarray:
    """Per video frame: power of the frame's audio window in dBFS, mapped to [0, 1]; (T,) float32.

    env[t] = clip((10 log10(mean(x^2) + 1e-10) - FLOOR) / (CEIL - FLOOR), 0, 1) with FLOOR = -50 dBFS
    and CEIL = -14 dBFS, over the samples of frame t (`frame_bounds`). Exact silence gives 0.
    """
    x = np.asarray(audio, np.float64)
    bounds = frame_bounds(x.size, sample_rate, fps)
    csum = np.concatenate([[0.0], np.cumsum(x * x)])
    power = (csum[bounds[1:]] - csum[bounds[:-1]]) / np.maximum(np.diff(bounds), 1)
    db = 10.0 * np.log10(np.maximum(power, 0.0) + 1e-10)
    env = (db - ENVELOPE_FLOOR_DB) / (ENVELOPE_CEIL_DB - ENVELOPE_FLOOR_DB)
    return np.clip(env, 0.0, 1.0).astype(np.float32)


def spectral_width(audio: np.ndarray, sample_rate: int, fps: float) -> np.ndarray:
    """Per video frame, 0 (rounded lips) .. 1 (spread), from the spectral centroid; (T,) float32.

    The centroid of the Hann-windowed power spectrum between 800 and 3000 Hz (roughly where the
    second formant lives: high for 'ee', low for 'oo') on a log scale from 1100 to 2200 Hz.
    """
    windows = _frame_windows(np.asarray(audio, np.float64), sample_rate, fps)
    out = np.full(len(windows), 0.5, np.float32)
    if not windows:
        return out
    n = max(w.size for w in windows)
    stack = np.zeros((len(windows), n))
    for i, w in enumerate(windows):
        stack[i, : w.size] = w * np.hanning(w.size)
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    band = (freqs >= 800.0) & (freqs <= 3000.0)
    power = np.abs(np.fft.rfft(stack, axis=1)[:, band]) ** 2
    total = power.sum(axis=1)
    centroid = (power * freqs[band]).sum(axis=1) / np.maximum(total, 1e-20)
    wide = (np.log(np.maximum(centroid, 1.0)) - np.log(WIDE_LO_HZ)) / (np.log(WIDE_HI_HZ) - np.log(WIDE_LO_HZ))
    out[:] = np.where(total > 1e-12, np.clip(wide, 0.0, 1.0), 0.5)
    return out


def _smooth3(x: np.ndarray) -> np.ndarray:
    """Symmetric [1, 2, 1] / 4 smoothing with edge padding: no shift."""
    p = np.pad(x, 1, mode="edge")
    return (0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]).astype(np.float32)


def mouth_from_audio(audio: np.ndarray, sample_rate: int, fps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mouth_open, mouth_wide, envelope), each (T,) float32, from the audio alone.

    mouth_open = smooth3(envelope); mouth_wide = 0.5 + (spectral_width - 0.5) * min(1, 2 * envelope),
    so silent frames keep a neutral width.
    """
    env = audio_envelope(audio, sample_rate, fps)
    mouth_open = np.clip(_smooth3(env), 0.0, 1.0)
    voiced = np.clip(2.0 * env, 0.0, 1.0)
    wide = 0.5 + (spectral_width(audio, sample_rate, fps) - 0.5) * voiced
    return mouth_open, _smooth3(wide), env


def blinks(rng: np.random.Generator, num_frames: int, fps: int) -> np.ndarray:
    """Blink closure (T,) in [0, 1]: a triangle 120-250 ms wide, every 2-6 s (first in 0.3-4 s)."""
    t = np.arange(num_frames) / fps
    out = np.zeros(num_frames, np.float32)
    centre = rng.uniform(0.3, 4.0)
    while centre < num_frames / fps + 0.5:
        half = rng.uniform(0.12, 0.25) / 2
        out = np.maximum(out, np.clip(1.0 - np.abs(t - centre) / half, 0.0, 1.0).astype(np.float32))
        centre += rng.uniform(2.0, 6.0)
    return out


def head_motion(rng: np.random.Generator, num_frames: int, fps: int, nodding: bool) -> np.ndarray:
    """Head offset (T, 2) in canonical units: a smooth drift of a few units (three slow sinusoids
    per axis, 0.05-0.5 Hz) plus, when nodding, a vertical 1.1-1.7 Hz swing of 2-3.5 units."""
    t = np.arange(num_frames) / fps
    out = np.zeros((num_frames, 2), np.float32)
    for axis, amp in ((0, 3.0), (1, 2.0)):
        freqs = rng.uniform(0.05, 0.5, 3)
        phases = rng.uniform(0, 2 * np.pi, 3)
        weights = rng.dirichlet(np.ones(3)) * amp * rng.uniform(0.5, 1.0)
        out[:, axis] = (weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(0)
    if nodding:
        out[:, 1] += rng.uniform(2.0, 3.5) * np.sin(2 * np.pi * rng.uniform(1.1, 1.7) * t + rng.uniform(0, 2 * np.pi))
    return out


def make_clip(
    seed: int, num_frames: int, cfg: WorldConfig = WorldConfig(), identity_seed: int | None = None
) -> WorldClip:
    """A clip of `num_frames` frames determined by `seed` (identity by `identity_seed` if given)."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    spf = cfg.samples_per_frame
    identity = sample_identity(np.random.default_rng([identity_seed if identity_seed is not None else seed, 0]))
    attrs = sample_attributes(np.random.default_rng([seed, 1]))
    audio = synth_speech(np.random.default_rng([seed, 2]), num_frames * spf, cfg.sample_rate)
    mouth_open, mouth_wide, env = mouth_from_audio(audio, cfg.sample_rate, cfg.fps)
    blink = blinks(np.random.default_rng([seed, 3]), num_frames, cfg.fps)
    head = head_motion(np.random.default_rng([seed, 4]), num_frames, cfg.fps, attrs.nodding)
    frames = render_frames(identity, attrs, mouth_open, mouth_wide, blink, head, cfg.height, cfg.width)
    return WorldClip(
        frames=frames,
        audio=audio,
        reference=reference_image(identity, None, cfg.height, cfg.width),
        prompt=prompt_for(attrs),
        identity=identity,
        attributes=attrs,
        mouth_open=mouth_open,
        mouth_wide=mouth_wide,
        envelope=env,
        blink=blink,
        head_xy=head,
    )


def make_clips(seeds: Iterable[int], num_frames: int, cfg: WorldConfig = WorldConfig()) -> Iterator[WorldClip]:
    """make_clip for each seed, lazily."""
    for seed in seeds:
        yield make_clip(seed, num_frames, cfg)
