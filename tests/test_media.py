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
from livetalk_cli.media import SAMPLE_RATE, aac_bit_rate, load_audio, load_audio_for_mux, load_image
from livetalk_cli.mp4 import VideoWriter, probe, read_video

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


# ------------------------------------------------------------------------- audio kept in the MP4


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def _two_channel(duration: float, rate: int) -> np.ndarray:
    """(samples, 2): a 440 Hz tone on the left, a 1 kHz tone (half as loud) on the right."""
    return np.stack([0.5 * _sine(duration, rate, 440.0), 0.25 * _sine(duration, rate, 1000.0)], axis=1)


def _mux_through_writer(path: Path, audio: np.ndarray, rate: int, fps: int = 16, layout: str | None = None) -> int:
    n = math.ceil(audio.shape[0] / rate * fps)
    with VideoWriter(path, 32, 32, fps=fps, audio=audio, sample_rate=rate, layout=layout) as w:
        w.write(_smooth_frames(n, 32, 32))
    return n


def test_48k_stereo_input_keeps_its_rate_channels_and_duration(tmp_path: Path) -> None:
    duration, rate = 1.3, 48000
    x_NC = _two_channel(duration, rate)
    _write_audio(tmp_path / "in.wav", "pcm_s16le", "s16", rate, np.ascontiguousarray(x_NC.T), rate)

    src = load_audio_for_mux(tmp_path / "in.wav")
    assert (src.sample_rate, src.layout, src.samples.shape) == (48000, "stereo", x_NC.shape)
    np.testing.assert_allclose(src.samples, x_NC, atol=2.0 / 32767)
    model_in = load_audio(tmp_path / "in.wav", SAMPLE_RATE)  # what the model hears: 16 kHz mono
    assert model_in.ndim == 1 and model_in.size == round(duration * SAMPLE_RATE)
    assert src.duration == pytest.approx(model_in.size / SAMPLE_RATE, abs=1 / SAMPLE_RATE)

    frames = _mux_through_writer(tmp_path / "out.mp4", src.samples, src.sample_rate, layout=src.layout)
    info = probe(tmp_path / "out.mp4")
    a = info["audio"]
    assert (a["codec"], a["sample_rate"], a["channels"], a["layout"]) == ("aac", 48000, 2, "stereo")
    assert abs(a["duration"] - duration) < 1e-3
    assert abs(info["video"]["duration"] - a["duration"]) < 1 / 16 and info["video"]["frames"] == frames
    assert aac_bit_rate(48000, 2) == 128_000 and 90_000 <= a["bit_rate"] <= 140_000  # was 64 kb/s for all

    out = load_audio_for_mux(tmp_path / "out.mp4")
    assert (out.sample_rate, out.layout, out.samples.shape) == (48000, "stereo", x_NC.shape)
    mid = slice(2000, -2000)  # away from the codec's edges
    y, x = out.samples[mid], x_NC[mid]
    assert _corr(y[:, 0], x[:, 0]) > 0.99 and _corr(y[:, 1], x[:, 1]) > 0.99
    assert abs(_corr(y[:, 0], x[:, 1])) < 0.1 and abs(_corr(y[:, 1], x[:, 0])) < 0.1  # not mixed
    assert _rms(y[:, 0]) == pytest.approx(2 * _rms(y[:, 1]), rel=0.05)


def test_16k_mono_input_stays_mono(tmp_path: Path) -> None:
    x = 0.4 * _sine(0.9, SAMPLE_RATE, 300.0)
    _write_wav(tmp_path / "in.wav", x)
    src = load_audio_for_mux(tmp_path / "in.wav")
    assert (src.sample_rate, src.layout, src.samples.shape) == (SAMPLE_RATE, "mono", (x.size, 1))
    _mux_through_writer(tmp_path / "out.mp4", src.samples, src.sample_rate, layout=src.layout)
    a = probe(tmp_path / "out.mp4")["audio"]
    assert (a["sample_rate"], a["channels"], a["layout"]) == (SAMPLE_RATE, 1, "mono")
    assert abs(a["duration"] - 0.9) < 1e-3
    assert aac_bit_rate(SAMPLE_RATE, 1) == 96_000  # the encoder's target; tones need fewer bits
    y = load_audio(tmp_path / "out.mp4")
    assert y.size == x.size and _corr(y[800:-800], x[800:-800]) > 0.99


def test_surround_is_downmixed_to_stereo_and_odd_rates_resampled(tmp_path: Path) -> None:
    rate, duration = 11000, 0.8  # 11 kHz is no AAC rate: the next one up is 11025 Hz
    x = np.zeros((round(duration * rate), 6), np.float32)  # 5.1: FL FR FC LFE BL BR
    x[:, :2] = _two_channel(duration, rate)
    _mux_through_writer(tmp_path / "out.mp4", x, rate, layout="5.1")
    a = probe(tmp_path / "out.mp4")["audio"]
    assert (a["sample_rate"], a["channels"]) == (11025, 2) and abs(a["duration"] - duration) < 1e-3
    y = load_audio_for_mux(tmp_path / "out.mp4").samples
    left, right = _two_channel(duration, 11025)[1000:-1000].T
    assert _corr(y[1000:-1000, 0], left) > 0.98 and _corr(y[1000:-1000, 1], right) > 0.98
    assert aac_bit_rate(8000, 1) == 48_000 and aac_bit_rate(48000, 2) == 128_000  # AAC's ceiling at 8 kHz


def test_video_writer_rejects_bad_audio_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="channels"):  # (channels, samples) passed by mistake
        VideoWriter(tmp_path / "o.mp4", 32, 32, fps=8, audio=np.zeros((2, 4000), np.float32))
    with pytest.raises(ValueError, match="layout"):
        VideoWriter(tmp_path / "o.mp4", 32, 32, fps=8, audio=np.zeros((4000, 2), np.float32), layout="5.1")
    assert list(tmp_path.iterdir()) == []
