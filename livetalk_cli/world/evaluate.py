"""Evaluate MP4 files with the world's metrics (`livetalk eval`): lip-sync, identity, stability, drift.

Each video is read with its own audio track and fps; its reference image comes from `reference`
or from a sidecar `<video stem>.ref.png` beside it. Results are written as one JSON document
{"videos": [...], "mean": {...}}, atomically (a temporary file renamed onto the destination).
A video shorter than `metrics.DRIFT_MIN_S` has no drift (null); the mean's drift is over the
videos that have one ('drift_videos' of them), null if none. With a window length, each video also
has 'windows' (lip-sync, offset, identity error and flicker per consecutive window) and the mean has
'windows': window i's mean over the videos that reach it ('videos' of them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from livetalk_cli.errors import UserError
from livetalk_cli.files import write_json_atomic
from livetalk_cli.media import SAMPLE_RATE, load_audio
from livetalk_cli.mp4 import probe, read_video
from livetalk_cli.world.metrics import evaluate_video

log = logging.getLogger(__name__)

# Scalar fields averaged over videos in the "mean" entry.
MEAN_KEYS = (
    "lip_sync_corr",
    "lip_sync_offset",
    "lip_sync_corr_at_zero",
    "identity_error",
    "flicker",
    "black_frames",
    "frozen_frames",
    "drift_per_min",
    "seconds",
)


def sidecar_reference(video: Path) -> Path:
    """Where `livetalk eval` looks for a video's reference image: <stem>.ref.png beside it."""
    return video.with_name(f"{video.stem}.ref.png")


def read_reference(path: Path, height: int, width: int) -> np.ndarray:
    """An RGB image as uint8 (height, width, 3), resized (Lanczos) if its size differs."""
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
            if img.size != (width, height):
                log.info("resizing reference %s from %dx%d to %dx%d", path, *img.size, width, height)
                img = img.resize((width, height), Image.Resampling.LANCZOS)
            return np.asarray(img, np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read reference image {path}: {' '.join(str(err).split())}") from err


WINDOW_KEYS = ("lip_sync_corr", "lip_sync_offset", "identity_error", "flicker")


def evaluate_file(video: Path, reference: Path | None, window_s: float | None = None) -> dict[str, Any]:
    """Metrics for one MP4 (see `metrics.evaluate_video`) plus its 'video' and 'reference' paths."""
    video = Path(video)
    ref_path = Path(reference) if reference is not None else sidecar_reference(video)
    if not video.is_file():
        raise UserError(f"video file not found: {video}")
    if not ref_path.is_file():
        hint = "" if reference is not None else f" (pass --reference or put {ref_path.name} beside the video)"
        raise UserError(f"reference image not found: {ref_path}{hint}")
    info = probe(video)
    if info["video"] is None:
        raise UserError(f"no video stream in {video}")
    if info["audio"] is None:
        raise UserError(f"no audio track in {video}: lip-sync needs the audio")
    fps = float(info["video"]["fps"])
    if fps <= 0:
        raise UserError(f"cannot tell the frame rate of {video}")
    frames = read_video(video)
    if frames.shape[0] == 0:
        raise UserError(f"no frames decoded from {video}")
    audio = load_audio(video, SAMPLE_RATE)
    ref = read_reference(ref_path, frames.shape[1], frames.shape[2])
    log.info("evaluating %s: %d frames at %.3f fps, %.2f s of audio", video, frames.shape[0], fps,
             audio.size / SAMPLE_RATE)
    result: dict[str, Any] = {"video": str(video), "reference": str(ref_path), "fps": fps}
    result.update(evaluate_video(frames, audio, SAMPLE_RATE, fps, ref, window_s))
    return result


def mean_result(results: list[dict[str, Any]]) -> dict[str, float | int | None]:
    """The mean of each field in MEAN_KEYS over the results that have it (not None), None where
    none has it, and 'drift_videos': how many had a drift (empty dict for no results)."""
    if not results:
        return {}
    mean: dict[str, float | int | None] = {}
    for k in MEAN_KEYS:
        values = [float(r[k]) for r in results if r.get(k) is not None]
        mean[k] = float(np.mean(values)) if values else None
    mean["drift_videos"] = sum(r.get("drift_per_min") is not None for r in results)
    if any("windows" in r for r in results):
        mean["windows"] = mean_windows([r.get("windows", []) for r in results])
    return mean


def mean_windows(per_video: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Window i's WINDOW_KEYS averaged over the videos that have a window i (its start and length
    from the first of them), with 'videos': how many."""
    out = []
    for i in range(max((len(w) for w in per_video), default=0)):
        ws = [w[i] for w in per_video if len(w) > i]
        row: dict[str, Any] = {"start_s": ws[0]["start_s"], "seconds": ws[0]["seconds"], "videos": len(ws)}
        row.update({k: float(np.mean([w[k] for w in ws])) for k in WINDOW_KEYS})
        out.append(row)
    return out


def evaluate_files(videos: list[Path], reference: Path | None, out_json: Path | None,
                   window_s: float | None = None) -> list[dict[str, Any]]:
    """Evaluate each video (all must be readable, else a UserError before anything is written);
    write {"videos": results, "mean": mean_result(results)} to `out_json` if given. `window_s`:
    also score consecutive windows of that many seconds."""
    if not videos:
        raise UserError("give at least one VIDEO file")
    if window_s is not None and not window_s > 0:
        raise UserError(f"--windows must be a number of seconds > 0, got {window_s:g}")
    results = [evaluate_file(Path(v), reference, window_s) for v in videos]
    if out_json is not None:
        write_json_atomic(Path(out_json), {"videos": results, "mean": mean_result(results)})
        log.info("wrote %s", out_json)
    return results
