"""Audio, image and video I/O: PyAV for audio/video, Pillow for images.

- `load_audio`: any audio PyAV decodes (or a video's audio track) -> mono float32 at 16 kHz
  (what the model hears).
- `load_audio_for_mux`: the same file at its own sample rate and channel layout (`MuxAudio`),
  to be carried into the output MP4.
- `load_image`: any image Pillow opens -> (3, H, W) float32 in [-1, 1], cropped or padded.
- The MP4 side (`VideoWriter`, `probe`, `read_video`) is in `mp4.py`.

Every failure the user can fix raises `MediaError` with one line naming the file; wrong
arguments from the calling code raise `ValueError`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
from PIL import Image, ImageOps

from livetalk_cli.errors import MediaError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# AAC-LC bit rates for mono / stereo, lowered at low sample rates to what an AAC frame holds
# (see `aac_bit_rate`).
AAC_BIT_RATES = {1: 96_000, 2: 128_000}
MAX_CHANNELS = 8  # a (samples, channels) array with more is taken for a transposed one
# Codec padding left after decoding (AAC pads its last frame to 1024 samples); a decoded stream
# longer than its declared duration by at most this many seconds is trimmed to the declared one.
_MAX_TRIM_S = 0.15
_AV_ERRORS = (av.FFmpegError, OSError, EOFError)


def check_input_file(path: str | Path, kind: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{kind} file not found: {p}")
    if not p.is_file():
        raise MediaError(f"{kind} path is not a file: {p}")
    if p.stat().st_size == 0:
        raise MediaError(f"{kind} file is empty (0 bytes): {p}")
    return p


def _one_line(err: BaseException) -> str:
    """The reason without errno numbers or repeated file names, on one line."""
    text = getattr(err, "strerror", None) or str(err)
    return " ".join(str(text).split()) or type(err).__name__


# ----------------------------------------------------------------------------------------- audio


@dataclass(frozen=True)
class MuxAudio:
    """Decoded audio as the source has it: float32 `samples` (num_samples, channels) in [-1, 1]
    at `sample_rate`, channels in the order of the FFmpeg `layout` ("mono", "stereo", "5.1", ...)."""

    samples: np.ndarray
    sample_rate: int
    layout: str

    @property
    def duration(self) -> float:
        return self.samples.shape[0] / self.sample_rate


def _decode_audio(p: Path | io.BytesIO, sample_rate: int | None) -> tuple[np.ndarray, int, str]:
    """First audio stream of `p` (a file, or the bytes of one) -> planar float32 (channels, n) at
    `sample_rate` (None: the source's), its rate and layout name; codec padding beyond the declared
    duration trimmed."""
    name = "the uploaded audio" if isinstance(p, io.BytesIO) else str(p)
    chunks: list[np.ndarray] = []
    rate, layout = 0, ""
    try:
        with av.open(p if isinstance(p, io.BytesIO) else str(p)) as container:
            if not container.streams.audio:
                raise MediaError(f"no audio stream in {name}")
            stream = container.streams.audio[0]
            declared_s = float(stream.duration * stream.time_base) if stream.duration else None
            # Keep the source layout (the callers mix channels themselves): swresample's
            # stereo->mono matrix sums at -3 dB per channel and can leave [-1, 1].
            resampler = av.AudioResampler(format="fltp", rate=sample_rate)
            for frame in container.decode(stream):
                frame.pts = None  # resample by sample count; timestamp gaps are not our business
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    rate, layout = out.sample_rate, out.layout.name
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
                rate, layout = out.sample_rate, out.layout.name
    except MediaError:
        raise
    except (*_AV_ERRORS, ValueError) as err:  # ValueError: e.g. a stream changing layout midway
        raise MediaError(f"cannot decode audio {name}: {_one_line(err)}") from err
    audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), np.float32)
    if audio.shape[1] == 0:
        raise MediaError(f"audio has no samples: {name}")
    if declared_s is not None:
        expected = round(declared_s * rate)
        if 0 < expected < audio.shape[1] <= expected + _MAX_TRIM_S * rate:
            audio = audio[:, :expected]
    return audio.astype(np.float32, copy=False), rate, layout


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of `path` to mono float32 at `sample_rate`, values in [-1, 1].

    Reads anything PyAV/FFmpeg decodes: wav, mp3, m4a/aac, flac, ogg/opus, or the audio track
    of a video. Channels are averaged into mono. Trailing codec padding (AAC) beyond the
    container's declared duration is trimmed. Returns shape (num_samples,).

    Raises:
        MediaError: the file is missing, not a file, unreadable or corrupt, has no audio
            stream, or decodes to 0 samples.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    audio, _, _ = _decode_audio(check_input_file(path, "audio"), sample_rate)
    return _mono(audio)


def decode_audio(data: bytes, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`load_audio` for the bytes of an audio file (an upload)."""
    audio, _, _ = _decode_audio(io.BytesIO(data), sample_rate)
    return _mono(audio)


def _mono(audio: np.ndarray) -> np.ndarray:
    """(channels, n) -> (n,) float32: channels averaged, clipped to [-1, 1]."""
    return np.clip(audio.mean(axis=0), -1.0, 1.0).astype(np.float32, copy=False)


def load_audio_for_mux(path: str | Path) -> MuxAudio:
    """Decode the first audio stream of `path` at its own sample rate and channel layout, for
    `VideoWriter` to carry into the output (`audio=a.samples, sample_rate=a.sample_rate,
    layout=a.layout`). Padding is trimmed as in `load_audio`: both give the same duration, to a
    sample.

    Raises:
        MediaError: as `load_audio`.
    """
    audio, rate, layout = _decode_audio(check_input_file(path, "audio"), None)
    if layout == f"{audio.shape[0]} channels":  # no channel order declared (e.g. a plain WAV)
        layout = av.AudioLayout(f"{audio.shape[0]}c").name  # FFmpeg's default: mono, stereo, 5.1, ...
    return MuxAudio(np.ascontiguousarray(np.clip(audio, -1.0, 1.0).T), rate, layout)


def write_wav(path: str | Path | io.BytesIO, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Mono float audio in [-1, 1] → 16-bit PCM WAV (clipped), to a file or into a buffer."""
    import wave

    with wave.open(path if isinstance(path, io.BytesIO) else str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).round().astype("<i2").tobytes())


def _convert_audio(
    audio_CN: np.ndarray, src_layout: str, src_rate: int, dst_layout: str, dst_rate: int
) -> np.ndarray:
    """Resample and/or remix (FFmpeg's downmix matrix) a whole planar float32 waveform with
    libswresample; the result has exactly round(n * dst_rate / src_rate) samples, clipped."""
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio_CN), format="fltp", layout=src_layout)
    frame.sample_rate = src_rate
    resampler = av.AudioResampler(format="fltp", layout=dst_layout, rate=dst_rate)
    outs = resampler.resample(frame) + resampler.resample(None)
    channels = len(av.AudioLayout(dst_layout).channels)
    out = np.concatenate([f.to_ndarray() for f in outs], axis=1) if outs else np.zeros((channels, 0), np.float32)
    n = round(audio_CN.shape[1] * dst_rate / src_rate)
    out = np.pad(out[:, :n], ((0, 0), (0, max(0, n - out.shape[1]))))
    return np.clip(out, -1.0, 1.0).astype(np.float32, copy=False)


def aac_bit_rate(sample_rate: int, channels: int) -> int:
    """AAC_BIT_RATES[channels], capped at 6144 bits per channel per 1024-sample frame (the most
    an AAC frame holds; FFmpeg would clamp there with a warning)."""
    return min(AAC_BIT_RATES[channels], 6144 * sample_rate // 1024 * channels)


# ----------------------------------------------------------------------------------------- image


def load_image(
    path: str | Path, height: int, width: int, fit: Literal["crop", "pad"] = "crop"
) -> torch.Tensor:
    """Load an image as a (3, height, width) float32 tensor in [-1, 1].

    Anything Pillow opens (PNG, JPEG, WebP, ...); the EXIF orientation is applied. Images with
    transparency (RGBA, LA, P with a transparent index) are composited over white; grayscale
    and palette images are converted to RGB.

    fit: 'crop' scales the image to cover (height, width) and crops the centre; 'pad' scales
        it to fit inside and pads the borders with black (-1).

    Raises:
        MediaError: the file is missing, not a file, or not a readable image.
    """
    _check_fit(height, width, fit)
    p = check_input_file(path, "image")
    return _fit_image(_read_image(p, f"image file {p}"), height, width, fit)


def _check_fit(height: int, width: int, fit: str) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}")


def decode_image(
    data: bytes, height: int, width: int, fit: Literal["crop", "pad"] = "crop", max_pixels: int = 40_000_000
) -> torch.Tensor:
    """`load_image` for the bytes of an image file (an upload): the same fitting, and images over
    `max_pixels` are refused before they are decoded."""
    _check_fit(height, width, fit)
    return _fit_image(_read_image(io.BytesIO(data), "the image", max_pixels), height, width, fit)


def _read_image(source: Path | io.BytesIO, name: str, max_pixels: int | None = None) -> Image.Image:
    """Open, check the size (before decoding), decode and orient an image -> RGB."""
    try:
        with Image.open(source) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise MediaError(f"image is {im.width}x{im.height}: over the limit of {max_pixels} pixels")
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise MediaError(f"cannot read {name}: {_one_line(err)}") from err


def _fit_image(img: Image.Image, height: int, width: int, fit: Literal["crop", "pad"]) -> torch.Tensor:
    arr = np.asarray(fit_pil(img, height, width, fit), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def fit_pil(img: Image.Image, height: int, width: int, fit: str) -> Image.Image:
    """`img` at height x width: scaled to cover and center-cropped (crop), or scaled to fit and
    centered on black (pad); Lanczos."""
    w0, h0 = img.size
    if fit == "crop":
        scale = max(width / w0, height / h0)
        w1, h1 = max(width, round(w0 * scale)), max(height, round(h0 * scale))
        img = img.resize((w1, h1), Image.Resampling.LANCZOS)
        left, top = (w1 - width) // 2, (h1 - height) // 2
        img = img.crop((left, top, left + width, top + height))
    else:
        scale = min(width / w0, height / h0)
        w1, h1 = min(width, max(1, round(w0 * scale))), min(height, max(1, round(h0 * scale)))
        canvas = Image.new("RGB", (width, height), (0, 0, 0))
        canvas.paste(img.resize((w1, h1), Image.Resampling.LANCZOS), ((width - w1) // 2, (height - h1) // 2))
        img = canvas
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale PNG
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / 257.0, 0, 255).astype(np.uint8))
    return img.convert("RGB")
