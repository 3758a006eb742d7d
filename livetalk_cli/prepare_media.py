"""Real talking-head videos → training clips (`livetalk prepare`'s reading side; shards: `prepare.py`).

A video is read as the preset sees the world: frames resampled to the preset's fps by sample and
hold (output frame j shows the last source frame whose timestamp is at most j/fps after the video
stream's start), cropped or padded to the preset's size (a box in source pixels first, if given),
and the audio track decoded to mono at the model's rate, aligned by the streams' start times. The
frames are cut into consecutive clips of `clip_frames` (the tail shorter than a clip is dropped),
each with the audio of exactly its frames. A clip's reference image (its frame 0: the
stream-start convention of `distill/data.py`) is its best-exposed sharp frame (`pick_reference`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from livetalk_cli.errors import MediaError
from livetalk_cli.media import check_input_file, fit_pil, load_audio

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")
_EPS = 1e-6  # seconds: a source frame stamped at an output frame's time is shown by it


@dataclass(frozen=True)
class Framing:
    """How a source video becomes the preset's clips."""

    height: int
    width: int
    fps: int
    sample_rate: int
    clip_frames: int
    fit: str = "crop"  # crop | pad

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps


@dataclass
class Clip:
    index: int  # the clip's number within its video
    frames: np.ndarray  # (T, H, W, 3) uint8; frame 0 is still the source's (see `with_reference`)
    audio: np.ndarray  # (T * samples_per_frame,) float32
    start_s: float  # where it starts in the video


def find_videos(paths: list[Path]) -> list[Path]:
    """Files as given, folders searched (recursively, sorted) for video files; each once."""
    out: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        elif p.exists():
            found = [p]
        else:
            raise MediaError(f"video file or folder not found: {p}")
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                out.append(f)
    return out


@dataclass(frozen=True)
class Probe:
    """What a video yields: its output frames and clips, or why it yields none."""

    frames: int
    clips: int
    reason: str | None = None  # why it is skipped (clips == 0)


def probe(path: Path, framing: Framing) -> Probe:
    """Count the output frames and clips without decoding a picture (timestamps from the packets);
    unreadable files raise MediaError."""
    check_input_file(path, "video")
    audio = load_audio(path, framing.sample_rate)
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise MediaError(f"no video stream in {path}")
            vs = c.streams.video[0]
            start, end, count = _start_s(vs), -math.inf, 0
            for packet in c.demux(vs):
                if packet.pts is None:
                    continue
                dur = float(packet.duration * vs.time_base) if packet.duration else _frame_s(vs)
                end = max(end, float(packet.pts * vs.time_base) + dur)
                count += 1
            offset = _audio_offset(c, start, framing.sample_rate)
    except MediaError:
        raise
    except (av.FFmpegError, ValueError) as e:
        raise MediaError(f"cannot read video {path}: {' '.join(str(e).split())}") from e
    if count == 0:
        return Probe(0, 0, "no video frames")
    frames = max(0, math.ceil((end - start) * framing.fps - _EPS))
    frames = min(frames, (len(audio) - max(offset, 0)) // framing.samples_per_frame)
    clips = frames // framing.clip_frames
    if clips == 0:
        return Probe(frames, 0, f"too short: {frames / framing.fps:.2f} s of video with audio, a clip is "
                                f"{framing.clip_frames / framing.fps:.2f} s")
    return Probe(frames, clips)


def read_clips(path: Path, framing: Framing, frames: int, *, box: tuple[int, int, int, int] | None = None,
               first_clip: int = 0) -> Iterator[Clip]:
    """The video's clips from `first_clip` on (`frames`: its output frame count from `probe`)."""
    audio = load_audio(path, framing.sample_rate)
    t = framing.clip_frames
    clips = frames // t
    if first_clip >= clips:
        return
    buf: list[np.ndarray] = []
    skip = first_clip * t  # output frames before the first clip wanted: not converted
    try:
        with av.open(str(path)) as c:
            vs = c.streams.video[0]
            vs.thread_type = "AUTO"
            start = _start_s(vs)
            offset = _audio_offset(c, start, framing.sample_rate)
            audio = np.concatenate([np.zeros(max(-offset, 0), np.float32), audio[max(offset, 0):]])
            last, img = None, None
            for j, frame in enumerate(_sample_and_hold(c.decode(vs), start, framing.fps, clips * t)):
                if j < skip:
                    continue
                if frame is not last:  # a held frame is converted once
                    last, img = frame, _fit_frame(frame, framing, box)
                buf.append(img)
                if len(buf) == t:
                    yield _clip(j // t, buf, audio, framing)
                    buf = []
    except (av.FFmpegError, ValueError) as e:
        raise MediaError(f"cannot decode video {path}: {' '.join(str(e).split())}") from e


def _sample_and_hold(decoded: Iterator[av.VideoFrame], start: float, fps: int,
                     total: int) -> Iterator[av.VideoFrame]:
    """Output frames 0 .. total-1: each the last source frame stamped at or before start + j/fps
    (the last source frame holds to the end)."""
    j, held = 0, None
    for frame in decoded:
        ts = frame.time if frame.time is not None else start + j / fps
        while j < total and held is not None and start + j / fps < ts - _EPS:
            yield held
            j += 1
        if j >= total:
            return
        held = frame
    while j < total and held is not None:
        yield held
        j += 1


def pick_reference(frames: np.ndarray) -> int:
    """The clip frame to use as its reference image: among frames with a usable exposure (mean luma
    in [0.2, 0.8] and under 2 % of pixels clipped at black or white), the sharpest (variance of the
    luma's Laplacian); if none is usable, the one whose mean luma is nearest 0.5."""
    luma = (frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0  # (T, H, W)
    mean = luma.mean(axis=(1, 2))
    clipped = ((luma <= 2 / 255) | (luma >= 253 / 255)).mean(axis=(1, 2))
    lap = (luma[:, 1:-1, :-2] + luma[:, 1:-1, 2:] + luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1]
           - 4 * luma[:, 1:-1, 1:-1])
    sharp = lap.reshape(len(frames), -1).var(axis=1)
    usable = (mean >= 0.2) & (mean <= 0.8) & (clipped < 0.02)
    if usable.any():
        return int(np.flatnonzero(usable)[np.argmax(sharp[usable])])
    return int(np.argmin(np.abs(mean - 0.5)))


def with_reference(frames: np.ndarray, ref: int) -> np.ndarray:
    """The clip as training sees it: frame 0 replaced by the reference frame."""
    out = frames.copy()
    out[0] = frames[ref]
    return out


def _clip(index: int, buf: list[np.ndarray], audio: np.ndarray, f: Framing) -> Clip:
    spf, t = f.samples_per_frame, f.clip_frames
    a = audio[index * t * spf: (index + 1) * t * spf]
    if len(a) < t * spf:  # probe counted frames that have audio: only a changed file gets here
        raise MediaError("the file changed while it was read")
    return Clip(index, np.stack(buf), a.astype(np.float32, copy=False), index * t / f.fps)


def _fit_frame(frame: av.VideoFrame, f: Framing, box: tuple[int, int, int, int] | None) -> np.ndarray:
    img: Image.Image = frame.to_image()
    if box is not None:
        x, y, w, h = box
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > img.width or y + h > img.height:
            raise MediaError(f"box {box} is not inside the {img.width}x{img.height} video")
        img = img.crop((x, y, x + w, y + h))
    return np.asarray(fit_pil(img, f.height, f.width, f.fit), dtype=np.uint8)


def _start_s(vs: av.video.stream.VideoStream) -> float:
    return float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0


def _frame_s(vs: av.video.stream.VideoStream) -> float:
    rate = vs.average_rate or vs.guessed_rate or 25
    return 1.0 / float(rate)


def _audio_offset(c: av.container.InputContainer, video_start: float, rate: int) -> int:
    """The audio sample (at `rate`) that plays at the video stream's start (negative: audio starts later)."""
    if not c.streams.audio:
        return 0
    a = c.streams.audio[0]
    a_start = float(a.start_time * a.time_base) if a.start_time is not None else 0.0
    return round((video_start - a_start) * rate)
