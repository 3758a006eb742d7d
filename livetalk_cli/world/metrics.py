"""Metrics on any talking-head video (uint8 frames + 16 kHz audio + a reference image).

- mouth opening: soft count of pixels near the world's mouth-interior colour (`measure_mouth_open`);
- lip-sync: Pearson correlation between mouth opening and the audio envelope over frame offsets;
- identity error: colour-histogram distance + coarse-layout error against the reference, per frame;
- temporal stability: flicker, black frames, frozen frames;
- drift: the trend of the identity error over a long video (>= DRIFT_MIN_S), per minute.

Every function accepts (T, H, W, 3) uint8 frames of any size; long videos are processed in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livetalk_cli.world.clip import audio_envelope
from livetalk_cli.world.face import mouth_colour_distance2

_CHUNK = 128  # frames per vectorised step
BLACK_MEAN = 10.0  # a frame whose mean intensity (0..255) is below this is black
FROZEN_DIFF = 0.25  # consecutive frames whose mean |difference| (0..255) is below this are frozen
HIST_BINS = 8  # per RGB channel, soft (linear) assignment
HIST_SIZE = 48  # frames are area-averaged to at most 48 x 48 before the histogram
LAYOUT_SIZE = 12  # the reference layout is compared at 12 x 12 area averages
# Shortest video whose drift is reported: the least-squares slope's noise falls as n^-1.5 in the
# n per-second points. On stationary ground-truth world clips (identity error ~0.02) the slope's
# spread is 0.034/min over 5 s (more than the error itself: noise extrapolated 12x to a minute),
# 0.017 over 10 s, 0.006 over 20 s and 0.003 over 30 s. From 20 s on it stays under a third of the
# error it is a trend of, and a minute is at most 3x the span measured.
DRIFT_MIN_S = 20


def measure_mouth_open(frames: np.ndarray) -> np.ndarray:
    """Visible mouth-interior area per frame as a fraction of the frame area; (T,) float32.

    Each pixel counts exp(-d2 / 2), where d2 is `face.mouth_colour_distance2` to the interior
    colour (luminance scale 40, chroma scale 14, on 0..255): a pixel of exactly that colour counts
    1, a blend with the lips half as much, skin, hair and background ~0. The soft kernel keeps the
    count proportional to the area after blur, noise and H.264 (4:2:0) compression.
    """
    _check_frames(frames)
    t, h, w, _ = frames.shape
    out = np.zeros(t, np.float32)
    for s in range(0, t, _CHUNK):
        chunk = frames[s: s + _CHUNK].astype(np.float32)
        out[s: s + _CHUNK] = np.exp(-0.5 * mouth_colour_distance2(chunk)).sum(axis=(1, 2)) / (h * w)
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either series is (numerically) constant or shorter than 3."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size < 3 or a.size != b.size:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    na, nb = float(np.sqrt((a * a).sum())), float(np.sqrt((b * b).sum()))
    if na < 1e-9 * max(1.0, a.size) or nb < 1e-9 * max(1.0, b.size):
        return 0.0
    return float(np.clip((a * b).sum() / (na * nb), -1.0, 1.0))


@dataclass
class LipSync:
    """correlation/offset: the best Pearson correlation over offsets and where it is.

    Sign convention: offset k > 0 means the video lags the audio by k frames, i.e. mouth[t]
    follows envelope[t - k]; k < 0 means the mouth moves before the sound.
    """

    correlation: float
    offset: int
    correlation_at_zero: float
    correlations: dict[int, float] = field(default_factory=dict)


def lagged_correlations(mouth: np.ndarray, env: np.ndarray, max_offset: int) -> dict[int, float]:
    """{k: pearson(mouth[t], env[t - k]) over the overlapping frames} for |k| <= max_offset."""
    n = min(mouth.size, env.size)
    mouth, env = mouth[:n], env[:n]
    max_offset = max(0, min(max_offset, n - 3))
    out: dict[int, float] = {}
    for k in range(-max_offset, max_offset + 1):
        if k >= 0:
            out[k] = pearson(mouth[k:], env[: n - k])
        else:
            out[k] = pearson(mouth[: n + k], env[-k:])
    return out


def lip_sync(frames: np.ndarray, audio: np.ndarray, sample_rate: int, fps: float, max_offset: int = 8) -> LipSync:
    """Correlate `measure_mouth_open(frames)` with `clip.audio_envelope(audio)` at frame offsets
    -max_offset..max_offset (Pearson over the overlap). The audio is cut or zero-padded to the
    video's duration first. Constant series (silence, a static mouth) give correlation 0.
    """
    mouth = measure_mouth_open(frames)
    env = envelope_for_video(audio, sample_rate, fps, mouth.size)
    corr = lagged_correlations(mouth, env, max_offset)
    best = max(corr, key=lambda k: (corr[k], -abs(k)))
    return LipSync(correlation=corr[best], offset=best, correlation_at_zero=corr.get(0, 0.0), correlations=corr)


def envelope_for_video(audio: np.ndarray, sample_rate: int, fps: float, num_frames: int) -> np.ndarray:
    """`audio_envelope` with exactly `num_frames` values: audio cut or zero-padded to the video."""
    need = int(round(num_frames * sample_rate / fps))  # the end of frame T-1 under `frame_bounds`
    audio = np.asarray(audio, np.float32)[:need]
    if audio.size < need:
        audio = np.pad(audio, (0, need - audio.size))
    env = audio_envelope(audio, sample_rate, fps)
    return np.pad(env, (0, max(0, num_frames - env.size)))[:num_frames]


# -------------------------------------------------------------------------------------- identity


def _area_resize(img: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) -> (N, size, size, C) float32: the mean over an even partition of the pixels
    (row i goes to cell i * size // H); size must not exceed H or W."""
    x = img.astype(np.float32, copy=False)
    for axis in (1, 2):
        n = x.shape[axis]
        starts = np.searchsorted(np.arange(n) * size // n, np.arange(size))
        counts = np.diff(np.append(starts, n)).astype(np.float32)
        shape = [1, 1, 1, 1]
        shape[axis] = size
        x = np.add.reduceat(x, starts, axis=axis) / counts.reshape(shape)
    return x


def _soft_histograms(img: np.ndarray) -> np.ndarray:
    """(N, P, 3) colours on 0..255 -> (N, bins^3) normalised joint histograms; each pixel's unit
    weight is split trilinearly between the 8 nearest bin centres (0, 255/7, ..., 255)."""
    n, p, _ = img.shape
    bins = HIST_BINS
    pos = img.astype(np.float32) * np.float32((bins - 1) / 255.0)
    lo = np.clip(np.floor(pos), 0, bins - 2).astype(np.int32)
    frac = pos - lo
    base = (np.arange(n, dtype=np.int32) * bins**3)[:, None]
    idx0 = (lo[..., 0] * bins + lo[..., 1]) * bins + lo[..., 2] + base  # (N, P)
    idx, wts = [], []
    for dr in (0, 1):
        wr = frac[..., 0] if dr else 1.0 - frac[..., 0]
        for dg in (0, 1):
            wrg = wr * (frac[..., 1] if dg else 1.0 - frac[..., 1])
            for db in (0, 1):
                idx.append(idx0 + ((dr * bins + dg) * bins + db))
                wts.append(wrg * (frac[..., 2] if db else 1.0 - frac[..., 2]))
    hist = np.bincount(np.concatenate(idx).ravel(), np.concatenate(wts).ravel(), n * bins**3).reshape(n, bins**3)
    return hist / np.maximum(hist.sum(1, keepdims=True), 1e-12)


def _hist_input(frames: np.ndarray) -> np.ndarray:
    """Frames (N, H, W, 3) -> (N, P, 3) pixels, area-averaged down to at most HIST_SIZE per side."""
    h, w = frames.shape[1:3]
    size = min(HIST_SIZE, h, w)
    small = _area_resize(frames, size) if size < max(h, w) else frames
    return np.asarray(small, np.float32).reshape(frames.shape[0], -1, 3)


def identity_error(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-frame identity error against the reference image, 0 (same) .. 1; (T,) float32.

    error = (histogram + layout) / 2, where
    - histogram: total-variation distance (half the L1) between joint RGB histograms with 8 soft
      bins per channel (frames area-averaged to <= 48 x 48 first): the palette of skin, hair,
      eyes, background; blind to where things are, so head motion barely matters;
    - layout: mean absolute difference of 12 x 12 area-averaged images, on 0..1: where the colours
      are; mouth, blinks and a few pixels of motion change a cell average only a little.
    The reference is resized to the frame size beforehand by the caller if needed.
    """
    _check_frames(frames)
    reference = np.asarray(reference)
    if reference.shape != frames.shape[1:]:
        raise ValueError(f"reference shape {reference.shape} does not match frames {frames.shape[1:]}")
    ref = reference[None].astype(np.float32)
    ref_hist = _soft_histograms(_hist_input(ref))
    ref_layout = _area_resize(ref, LAYOUT_SIZE)
    out = np.zeros(frames.shape[0], np.float32)
    for s in range(0, frames.shape[0], _CHUNK):
        chunk = frames[s: s + _CHUNK].astype(np.float32)
        tv = 0.5 * np.abs(_soft_histograms(_hist_input(chunk)) - ref_hist).sum(1)
        layout = np.abs(_area_resize(chunk, LAYOUT_SIZE) - ref_layout).mean(axis=(1, 2, 3)) / 255.0
        out[s: s + _CHUNK] = 0.5 * (tv + layout)
    return out


# ------------------------------------------------------------------------------------- stability


@dataclass
class Stability:
    flicker: float  # mean over t >= 1 of mean |frame_t - frame_{t-1}|, on 0..255
    black_frames: float  # fraction of frames with mean intensity < BLACK_MEAN (10 on 0..255)
    frozen_frames: float  # fraction of consecutive pairs with mean |difference| < FROZEN_DIFF (0.25)


def temporal_stability(frames: np.ndarray) -> Stability:
    """Flicker, black and frozen frames; see `Stability` for the definitions and thresholds."""
    _check_frames(frames)
    t = frames.shape[0]
    means = np.array([float(f.mean()) for f in frames])
    diffs = np.array(
        [float(np.abs(frames[i].astype(np.int16) - frames[i - 1].astype(np.int16)).mean()) for i in range(1, t)]
    )
    return Stability(
        flicker=float(diffs.mean()) if diffs.size else 0.0,
        black_frames=float((means < BLACK_MEAN).mean()) if t else 0.0,
        frozen_frames=float((diffs < FROZEN_DIFF).mean()) if diffs.size else 0.0,
    )


# ------------------------------------------------------------------------------------------ drift


def per_second(values: np.ndarray, fps: float) -> np.ndarray:
    """Means over consecutive whole seconds (round(fps) frames; a last partial second is dropped)."""
    step = max(1, int(round(fps)))
    n = values.size // step
    return np.asarray(values[: n * step], np.float64).reshape(n, step).mean(1)


def drift(identity_errors: np.ndarray, fps: float) -> float:
    """Slope of the least-squares line through the per-second mean identity error, in error units
    per minute (positive: the video moves away from the reference). 0.0 under two seconds.
    No minimum length: `drift_per_min` is the one to report."""
    y = per_second(np.asarray(identity_errors, np.float64), fps)
    if y.size < 2:
        return 0.0
    x = np.arange(y.size, dtype=np.float64)
    slope = float(np.polyfit(x, y, 1)[0])  # per second
    return slope * 60.0


def drift_per_min(identity_errors: np.ndarray, fps: float, min_seconds: int = DRIFT_MIN_S) -> float | None:
    """`drift` when the video has at least `min_seconds` whole seconds (per-second points), else
    None: a shorter clip's slope is mostly noise (see DRIFT_MIN_S)."""
    if min_seconds < 2:
        raise ValueError(f"min_seconds must be at least 2 (a line needs two points), got {min_seconds}")
    if per_second(np.asarray(identity_errors), fps).size < min_seconds:
        return None
    return drift(identity_errors, fps)


def windowed_identity_error(identity_errors: np.ndarray, fps: float, window_s: float = 10.0) -> list[float]:
    """Mean identity error over consecutive windows of `window_s` seconds (the last may be shorter)."""
    step = max(1, int(round(window_s * fps)))
    e = np.asarray(identity_errors, np.float64)
    return [float(e[i: i + step].mean()) for i in range(0, e.size, step)]


def window_spans(num_frames: int, fps: float, window_s: float) -> list[tuple[int, int]]:
    """Consecutive windows [start, end) of round(window_s * fps) frames; a remainder of at least
    half a window is a last, shorter window (a shorter one is left out: too few frames to score).
    A video shorter than one window is one window."""
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    step = max(1, int(round(window_s * fps)))
    spans = [(a, a + step) for a in range(0, num_frames - step + 1, step)]
    rest = spans[-1][1] if spans else 0
    if num_frames - rest >= max(1, step // 2) or (not spans and num_frames > 0):
        spans.append((rest, num_frames))
    return spans


def windowed_metrics(frames: np.ndarray, audio: np.ndarray, sample_rate: int, fps: float, reference: np.ndarray,
                     window_s: float, identity: np.ndarray | None = None) -> list[dict[str, float | int]]:
    """Lip-sync (correlation and best offset, each window scored on its own frames and audio),
    identity error and flicker per consecutive window of `window_s` seconds (`window_spans`).
    `identity`: the per-frame identity errors, if already computed."""
    _check_frames(frames)
    ident = identity_error(frames, reference) if identity is None else np.asarray(identity)
    out: list[dict[str, float | int]] = []
    for a, b in window_spans(frames.shape[0], fps, window_s):
        lo, hi = int(round(a * sample_rate / fps)), int(round(b * sample_rate / fps))
        sync = lip_sync(frames[a:b], np.asarray(audio)[lo:hi], sample_rate, fps)
        out.append({
            "start_s": a / fps, "seconds": (b - a) / fps,
            "lip_sync_corr": sync.correlation, "lip_sync_offset": int(sync.offset),
            "identity_error": float(ident[a:b].mean()),
            "flicker": temporal_stability(frames[a:b]).flicker,
        })
    return out


# ----------------------------------------------------------------------------------------- report


def evaluate_video(
    frames: np.ndarray, audio: np.ndarray, sample_rate: int, fps: float, reference: np.ndarray,
    window_s: float | None = None,
) -> dict[str, Any]:
    """All metrics for one video as JSON-serialisable plain numbers. 'drift_per_min' is None for
    videos under DRIFT_MIN_S seconds; 'drift_window_s' is the span it is (or would be) fitted
    over (whole seconds) and 'drift_min_s' the minimum. With `window_s`, 'windows' holds
    `windowed_metrics` of consecutive windows of that many seconds."""
    _check_frames(frames)
    sync = lip_sync(frames, audio, sample_rate, fps)
    ident = identity_error(frames, reference)
    stab = temporal_stability(frames)
    result: dict[str, Any] = {
        "frames": int(frames.shape[0]),
        "seconds": float(frames.shape[0] / fps),
        "lip_sync_corr": sync.correlation,
        "lip_sync_offset": int(sync.offset),
        "lip_sync_corr_at_zero": sync.correlation_at_zero,
        "identity_error": float(ident.mean()) if ident.size else 0.0,
        "identity_error_windows": windowed_identity_error(ident, fps),
        "flicker": stab.flicker,
        "black_frames": stab.black_frames,
        "frozen_frames": stab.frozen_frames,
        "drift_per_min": drift_per_min(ident, fps),
        "drift_window_s": float(per_second(ident, fps).size),
        "drift_min_s": float(DRIFT_MIN_S),
    }
    if window_s is not None:
        result["windows"] = windowed_metrics(frames, audio, sample_rate, fps, reference, window_s, ident)
    return result


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        got = frames.shape if isinstance(frames, np.ndarray) else type(frames)
        raise ValueError(f"frames must be (T, H, W, 3), got {got}")
