"""Render audio files into MP4 avatar videos: one job or a batch manifest, resumable.

Each job: decode the audio (16 kHz mono), stream blocks through the sampler and the VAE decoder,
and write frames as they come (H.264 + AAC, faststart) to a temporary file renamed on success.
The video covers the audio: ceil(duration * fps) frames, the last block padded and trimmed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from livetalk_cli.errors import UserError
from livetalk_cli.jobs import PlannedJob, RenderJob, encode_record
from livetalk_cli.media import load_audio, load_audio_for_mux, load_image
from livetalk_cli.mp4 import VideoWriter
from livetalk_cli.pipeline import LoadedModel
from livetalk_cli.runtime.scheduler import stream_video
from livetalk_cli.runtime.stream import AvatarStream, StreamOptions, blocks_for_video_frames, frames_to_uint8

log = logging.getLogger(__name__)

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


def render_job(
    model: LoadedModel,
    job: RenderJob,
    *,
    seed: int = 0,
    fit: Literal["crop", "pad"] = "crop",
    options: StreamOptions | None = None,
    on_frames: Callable[[int, int], None] | None = None,
    record: dict[str, str] | None = None,
) -> JobResult:
    """Render one job. `on_frames(written, total)` is called after each block is written.
    `fit`: the reference image is scaled and center-cropped, or scaled and padded, to the preset's size.
    `record` (what the output is made from, see `jobs.job_record`) goes into the MP4's comment tag."""
    t0 = time.perf_counter()
    cfg = model.cfg
    wave_np = load_audio(job.audio, cfg.audio.sample_rate)  # what the model hears: 16 kHz mono
    mux = load_audio_for_mux(job.audio)  # what the MP4 carries: the source's rate and channels
    image = load_image(job.image, cfg.height, cfg.width, fit)
    total = video_frame_count(len(wave_np), cfg.audio.sample_rate, cfg.fps)
    wave = torch.from_numpy(wave_np)
    stream = AvatarStream(model, options or StreamOptions())
    stream.start(image, job.prompt, seed)
    n_blocks = blocks_for_video_frames(total, cfg.stream.block_frames, stream.tf)
    job.out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with VideoWriter(job.out, cfg.width, cfg.height, cfg.fps, audio=mux.samples, sample_rate=mux.sample_rate,
                     layout=mux.layout,
                     metadata={"comment": encode_record(record)} if record else None) as writer:
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
    model: LoadedModel | None,
    jobs: list[PlannedJob],
    *,
    seed: int = 0,
    fit: Literal["crop", "pad"] = "crop",
    options: StreamOptions | None = None,
    on_job_start: Callable[[RenderJob], None] | None = None,
    on_frames: Callable[[int, int], None] | None = None,
    on_job_end: Callable[[JobResult], None] | None = None,
) -> list[JobResult]:
    """Render every planned job (`jobs.plan_jobs` checked them); outputs found finished are skipped
    (resume) and a failing job does not stop the others. The results say which failed and why."""
    results = []
    for planned in jobs:
        job = planned.job
        if planned.skip:
            result = JobResult(job, "skipped")
        elif model is None:
            raise ValueError("render_batch: a model is needed for jobs that are not skipped")
        else:
            if on_job_start is not None:
                on_job_start(job)
            try:
                result = render_job(model, job, seed=seed, fit=fit, options=options, on_frames=on_frames,
                                    record=planned.record)
            except UserError as e:
                result = JobResult(job, "failed", error=str(e))
            except Exception as e:  # one broken job must not take the batch down
                log.info("job %s crashed (traceback shown with -v)", job.audio, exc_info=True)
                result = JobResult(job, "failed", error=f"{type(e).__name__}: {e}")
        results.append(result)
        if on_job_end is not None:
            on_job_end(result)
    return results
