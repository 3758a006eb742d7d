"""Tests for livetalk_cli.media: every input file is generated into tmp_path (CPU, a few seconds)."""

from __future__ import annotations

import math
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from livetalk_cli.errors import MediaError
from livetalk_cli.media import (
    SAMPLE_RATE,
    VideoWriter,
    load_audio,
    load_image,
    probe,
    read_video,
)

# ---------------------------------------------------------------------------------------- helpers


def _write_audio(
    path: Path, codec: str, sample_fmt: str, rate: int, x_CN: np.ndarray, src_rate: int
) -> None:
    """Encode float32 (channels, samples) audio at src_rate with PyAV."""
    layout = "stereo" if x_CN.shape[0] == 2 else "mono"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x_CN), format="fltp", layout=layout)
        frame.sample_rate = src_rate
        frame.pts = 0  # timestamps let the muxer record the encoder priming (MP4 edit list)
        frame_size = stream.codec_context.frame_size or None
        resampler = av.AudioResampler(format=sample_fmt, layout=layout, rate=rate, frame_size=frame_size)
        for out in resampler.resample(frame) + resampler.resample(None):
            container.mux(stream.encode(out))
        container.mux(stream.encode(None))


def _write_wav(path: Path, x: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def _sine(duration: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(duration * rate)) / rate
    return np.sin(2 * np.pi * freq * t).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _smooth_frames(n: int, h: int, w: int) -> np.ndarray:
    """Slowly moving colour gradients, uint8 (n, h, w, 3)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = [
        np.stack([80 + 100 * xx / w + 4 * i, 60 + 120 * yy / h, 200 - 80 * (xx + yy) / (h + w)], -1)
        for i in range(n)
    ]
    return np.clip(frames, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ audio


def test_load_audio_wav_exact(tmp_path: Path) -> None:
    x = 0.5 * _sine(1.0, SAMPLE_RATE)
    _write_wav(tmp_path / "a.wav", x)
    y = load_audio(tmp_path / "a.wav")
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1.0 / 32767)


# (extension, encoder, encoder sample format, encoder rate, length tolerance in seconds)
FORMATS = [
    ("wav", "pcm_s16le", "s16", 44100, 0.0),
    ("flac", "flac", "s16", 44100, 0.0),
    ("mp3", "libmp3lame", "fltp", 44100, 0.005),
    ("ogg", "libopus", "flt", 48000, 0.005),
    ("m4a", "aac", "fltp", 44100, 0.005),
]


@pytest.mark.parametrize(("ext", "codec", "fmt", "rate", "tol"), FORMATS, ids=[f[0] for f in FORMATS])
def test_load_audio_formats_stereo_44k(
    tmp_path: Path, ext: str, codec: str, fmt: str, rate: int, tol: float
) -> None:
    duration, src_rate = 1.23, 44100
    s = _sine(duration, src_rate)
    x_CN = np.stack([0.6 * s, 0.2 * s])  # mono mix = mean = 0.4 * sine
    path = tmp_path / f"a.{ext}"
    _write_audio(path, codec, fmt, rate, x_CN, src_rate)

    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(y.size - duration * SAMPLE_RATE) <= max(1, tol * SAMPLE_RATE), y.size
    assert np.abs(y).max() <= 1.0
    mid = y[SAMPLE_RATE // 10 : -SAMPLE_RATE // 10]  # away from codec edge effects
    assert _rms(mid) == pytest.approx(0.4 / math.sqrt(2), rel=0.08)
    spectrum = np.abs(np.fft.rfft(mid))
    assert np.fft.rfftfreq(mid.size, 1 / SAMPLE_RATE)[spectrum.argmax()] == pytest.approx(440, abs=3)


def test_load_audio_other_sample_rate(tmp_path: Path) -> None:
    _write_wav(tmp_path / "a.wav", 0.5 * _sine(0.5, SAMPLE_RATE))
    y = load_audio(tmp_path / "a.wav", sample_rate=24000)
    assert y.size == 12000
    assert _rms(y[1000:-1000]) == pytest.approx(0.5 / math.sqrt(2), rel=0.02)


def _video_without_audio(path: Path) -> None:
    with VideoWriter(path, 32, 32, fps=8, audio=None) as w:
        w.write(_smooth_frames(4, 32, 32))


@pytest.mark.parametrize("case", ["missing", "directory", "text", "empty_file", "no_samples", "no_audio"])
def test_load_audio_errors(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.wav"
    if case == "directory":
        path.mkdir()
    elif case == "text":
        path.write_text("this is not audio\n" * 20)
    elif case == "empty_file":
        path.write_bytes(b"")
    elif case == "no_samples":
        _write_wav(path, np.zeros(0, np.float32))
    elif case == "no_audio":
        path = tmp_path / "silent_movie.mp4"
        _video_without_audio(path)
    with pytest.raises(MediaError) as info:
        load_audio(path)
    message = str(info.value)
    assert path.name in message and "\n" not in message


# ------------------------------------------------------------------------------------------ image


def test_load_image_rgba_png_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((40, 40, 4), np.uint8)
    arr[:, :20] = (255, 0, 0, 255)  # opaque red left half, transparent black right half
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 40, 40)
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 5, 5], torch.tensor([1.0, -1.0, -1.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(x[:, 5, 35], torch.tensor([1.0, 1.0, 1.0]), atol=0.02, rtol=0)


def test_load_image_grayscale_jpeg_and_webp(tmp_path: Path) -> None:
    gray = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    Image.fromarray(gray, "L").save(tmp_path / "g.jpg", quality=95)
    x = load_image(tmp_path / "g.jpg", 48, 64)
    assert x.shape == (3, 48, 64)
    torch.testing.assert_close(x[0], x[1])
    torch.testing.assert_close(x[1], x[2])
    assert x.min() < -0.9 and x.max() > 0.9

    Image.fromarray(_smooth_frames(1, 50, 70)[0]).save(tmp_path / "c.webp", quality=90)
    y = load_image(tmp_path / "c.webp", 32, 32)
    assert y.shape == (3, 32, 32) and -1.0 <= y.min() and y.max() <= 1.0


def test_load_image_crop_and_pad(tmp_path: Path) -> None:
    arr = np.zeros((100, 300, 3), np.uint8)  # wide: red | green | blue thirds
    arr[:, :100, 0] = arr[:, 100:200, 1] = arr[:, 200:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")

    crop = load_image(tmp_path / "wide.png", 64, 48, fit="crop")  # cover then centre crop: all green
    assert crop.shape == (3, 64, 48)
    torch.testing.assert_close(crop.mean(dim=(1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.02, rtol=0)

    pad = load_image(tmp_path / "wide.png", 64, 48, fit="pad")  # 48x16 content, black bars above/below
    assert pad.shape == (3, 64, 48) and -1.0 <= pad.min() and pad.max() <= 1.0
    assert torch.all(pad[:, :20] == -1.0) and torch.all(pad[:, -20:] == -1.0)
    torch.testing.assert_close(pad[:, 32, 24], torch.tensor([-1.0, 1.0, -1.0]), atol=0.05, rtol=0)


def test_load_image_exif_orientation(tmp_path: Path) -> None:
    img = Image.new("RGB", (60, 30), (255, 255, 255))  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display -> portrait
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    x = load_image(tmp_path / "rot.jpg", 64, 64, fit="pad")  # portrait content -> bars left/right
    assert torch.all(x[:, :, :10] == -1.0) and torch.all(x[:, :, -10:] == -1.0)
    assert x[:, :, 28:36].min() > 0.9


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated"])
def test_load_image_errors(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.png"
    if case == "corrupt":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    elif case == "truncated":
        Image.fromarray(_smooth_frames(1, 64, 64)[0]).save(path)
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(MediaError, match=path.name):
        load_image(path, 32, 32)


# ------------------------------------------------------------------------------------------ video


@pytest.mark.parametrize("duration", [0.73, 1.0, 2.31])
def test_video_writer_durations(tmp_path: Path, duration: float) -> None:
    fps, h, w = 16, 48, 64
    audio = 0.3 * _sine(duration, SAMPLE_RATE, 220.0)
    n = math.ceil(duration * fps)
    frames = _smooth_frames(n, h, w)
    path = tmp_path / "out.mp4"
    with VideoWriter(path, w, h, fps=fps, audio=audio) as writer:
        for start in range(0, n, 5):  # several write calls of uneven size
            writer.write(frames[start : start + 5])

    info = probe(path)
    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
    v, a = info["video"], info["audio"]
    assert (v["codec"], v["pix_fmt"], v["width"], v["height"]) == ("h264", "yuv420p", w, h)
    assert a["codec"] == "aac" and a["sample_rate"] == SAMPLE_RATE
    assert v["frames"] == n and v["fps"] == pytest.approx(fps)
    period = 1.0 / fps
    assert abs(a["duration"] - duration) < 1e-3
    assert abs(v["duration"] - duration) < period and abs(v["duration"] - a["duration"]) < period
    assert abs(info["format_duration"] - v["duration"]) < period
    assert info["faststart"] is True

    decoded = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(np.float32) - frames).mean() < 3.0

    y = load_audio(path)  # the audio track of a video; priming and padding are trimmed
    assert y.size == audio.size
    assert _rms(y[800:-800] - audio[800:-800]) < 0.1 * _rms(audio)


def test_video_writer_resamples_unsupported_rate(tmp_path: Path) -> None:
    audio = 0.3 * _sine(0.5, 11000, 220.0)  # 11 kHz is not an AAC rate
    with VideoWriter(tmp_path / "o.mp4", 32, 32, fps=10, audio=audio, sample_rate=11000) as writer:
        writer.write(_smooth_frames(5, 32, 32))
    info = probe(tmp_path / "o.mp4")
    assert info["audio"]["duration"] == pytest.approx(0.5, abs=1e-3)
    assert info["video"]["frames"] == 5


def test_video_writer_exception_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    audio = _sine(1.0, SAMPLE_RATE)
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(path, 32, 32, fps=8, audio=audio) as w:
        w.write(_smooth_frames(3, 32, 32))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_video_writer_abort_and_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "out.mp4"
    writer = VideoWriter(path, 32, 32, fps=8, audio=None)
    writer.write(_smooth_frames(2, 32, 32))
    writer.abort()
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ValueError, match="even"):
        VideoWriter(path, 33, 32, fps=8, audio=None)
    with VideoWriter(path, 32, 32, fps=8, audio=None) as writer:
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((1, 32, 32, 3), np.float32))
        writer.write(_smooth_frames(1, 32, 32))
    assert probe(path)["audio"] is None and probe(path)["video"]["frames"] == 1
    with pytest.raises(MediaError, match="directory"):
        VideoWriter(tmp_path / "missing_dir" / "o.mp4", 32, 32, fps=8, audio=None)
