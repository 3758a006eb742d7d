"""Render audio files into MP4 avatar videos: one job or a batch manifest, resumable.

Each job: decode the audio (16 kHz mono), stream blocks through the sampler and the VAE decoder,
and write frames as they come (H.264 + AAC, faststart) to a temporary file renamed on success.
The video covers the audio: ceil(duration * fps) frames, the last block padded and trimmed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from livetalk_cli.errors import UserError
from livetalk_cli.media import VideoWriter, load_audio, load_image
from livetalk_cli.pipeline import LoadedModel
from livetalk_cli.runtime.scheduler import stream_video
from livetalk_cli.runtime.stream import AvatarStream, StreamOptions, blocks_for_video_frames, frames_to_uint8

log = logging.getLogger(__name__)

MANIFEST_KEYS = {"audio", "image", "prompt", "out"}


@dataclass(frozen=True)
class RenderJob:
    audio: Path
    image: Path
    prompt: str
    out: Path


@dataclass
class JobResult:
    job: RenderJob
    status: Literal["done", "skipped", "failed"]
    error: str | None = None
    frames: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0

    @property
    def realtime_factor(self) -> float:
        """Seconds of video made per wall-clock second (> 1 is faster than real time)."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0


def video_frame_count(num_samples: int, sample_rate: int, fps: int) -> int:
    """ceil(duration * fps) in exact integer arithmetic."""
    return -(-num_samples * fps // sample_rate)


def jobs_from_args(
    audio: list[Path], image: Path | None, prompt: str, out: Path | None, out_dir: Path | None
) -> list[RenderJob]:
    if not audio:
        raise UserError("give at least one AUDIO file, or --manifest")
    if image is None:
        raise UserError("--image is required (the reference face)")
    if (out is None) == (out_dir is None):
        raise UserError("give exactly one of --out (one audio file) or --out-dir")
    if out is not None:
        if len(audio) > 1:
            raise UserError("--out takes one audio file; use --out-dir for several")
        return [RenderJob(Path(audio[0]), Path(image), prompt, Path(out))]
    assert out_dir is not None
    return [RenderJob(Path(a), Path(image), prompt, Path(out_dir) / f"{Path(a).stem}.mp4") for a in audio]


def read_manifest(path: Path, *, image: Path | None, prompt: str) -> list[RenderJob]:
    """JSON lines {audio, image?, prompt?, out}; relative paths are relative to the manifest.
    A malformed line is an error naming the line, before anything renders."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read manifest {path}: {e}") from None
    base = path.parent
    jobs = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(entry, dict):
            raise UserError(f"{where}: each line must be a JSON object")
        unknown = sorted(set(entry) - MANIFEST_KEYS)
        if unknown:
            raise UserError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(MANIFEST_KEYS)}")
        for key in ("audio", "out"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise UserError(f"{where}: '{key}' (a path string) is required")
        img = entry.get("image", None if image is None else str(image))
        if not isinstance(img, str):
            raise UserError(f"{where}: 'image' is required (or pass --image as the default)")
        text = entry.get("prompt", prompt)
        if not isinstance(text, str):
            raise UserError(f"{where}: 'prompt' must be a string")
        jobs.append(RenderJob(base / entry["audio"], base / img, text, base / entry["out"]))
    if not jobs:
        raise UserError(f"manifest {path} has no jobs")
    return jobs


def check_unique_outputs(jobs: list[RenderJob]) -> None:
    seen: dict[Path, int] = {}
    for i, job in enumerate(jobs):
        key = job.out.resolve()
        if key in seen:
            raise UserError(f"jobs {seen[key] + 1} and {i + 1} both write {job.out}")
        seen[key] = i


def render_job(
    model: LoadedModel,
    job: RenderJob,
    *,
    seed: int = 0,
    fit: Literal["crop", "pad"] = "crop",
    options: StreamOptions | None = None,
    on_frames: Callable[[int, int], None] | None = None,
) -> JobResult:
    """Render one job. `on_frames(written, total)` is called after each block is written.
    `fit`: the reference image is scaled and center-cropped, or scaled and padded, to the preset's size."""
    t0 = time.perf_counter()
    cfg = model.cfg
    wave_np = load_audio(job.audio, cfg.audio.sample_rate)
    image = load_image(job.image, cfg.height, cfg.width, fit)
    total = video_frame_count(len(wave_np), cfg.audio.sample_rate, cfg.fps)
    wave = torch.from_numpy(wave_np)
    stream = AvatarStream(model, options or StreamOptions())
    stream.start(image, job.prompt, seed)
    n_blocks = blocks_for_video_frames(total, cfg.stream.block_frames, stream.tf)
    job.out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with VideoWriter(job.out, cfg.width, cfg.height, cfg.fps, audio=wave_np,
                     sample_rate=cfg.audio.sample_rate) as writer:
        for video in stream_video(stream, wave, n_blocks):
            frames = frames_to_uint8(video)[: total - written]
            if not len(frames):
                continue
            writer.write(frames)
            written += len(frames)
            if on_frames is not None:
                on_frames(written, total)
    assert written == total, (written, total)
    return JobResult(job, "done", frames=total, audio_s=len(wave_np) / cfg.audio.sample_rate,
                     wall_s=time.perf_counter() - t0)


def render_batch(
    model: LoadedModel,
    jobs: list[RenderJob],
    *,
    seed: int = 0,
    fit: Literal["crop", "pad"] = "crop",
    overwrite: bool = False,
    options: StreamOptions | None = None,
    on_job_start: Callable[[RenderJob], None] | None = None,
    on_frames: Callable[[int, int], None] | None = None,
    on_job_end: Callable[[JobResult], None] | None = None,
) -> list[JobResult]:
    """Render every job; finished outputs are skipped (resume) and a failing job does not stop
    the others. The results say which failed and why."""
    check_unique_outputs(jobs)
    results = []
    for job in jobs:
        if job.out.exists() and not overwrite:
            result = JobResult(job, "skipped")
        else:
            if on_job_start is not None:
                on_job_start(job)
            try:
                result = render_job(model, job, seed=seed, fit=fit, options=options, on_frames=on_frames)
            except UserError as e:
                result = JobResult(job, "failed", error=str(e))
            except Exception as e:  # one broken job must not take the batch down
                log.info("job %s crashed (traceback shown with -v)", job.audio, exc_info=True)
                result = JobResult(job, "failed", error=f"{type(e).__name__}: {e}")
        results.append(result)
        if on_job_end is not None:
            on_job_end(result)
    return results
