"""What `livetalk render` is asked to do, checked before the model loads.

A job is (audio, image, prompt, out). Jobs come from the command line (paths relative to the
working directory) or from a manifest (paths inside it relative to the manifest's folder; the
`--image` default stays relative to the working directory). `plan_jobs` checks every job's
inputs and output before anything expensive runs and decides, for an output that exists already,
whether it is this job's finished result (skip: a batch resumes) or something else (an error
asking for --overwrite). What made an output is recorded in the MP4 itself (its `comment` tag).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from livetalk_cli.errors import UserError
from livetalk_cli.files import check_writable
from livetalk_cli.media import check_input_file, load_audio, load_image
from livetalk_cli.mp4 import read_comment

MANIFEST_KEYS = {"audio", "image", "prompt", "out"}
RECORD_TAG = "livetalk-render "  # prefix of the MP4 comment holding a render's record


@dataclass(frozen=True)
class RenderJob:
    audio: Path
    image: Path
    prompt: str
    out: Path
    where: str = ""  # "manifest.jsonl:3" for manifest jobs: error messages name the line


@dataclass(frozen=True)
class PlannedJob:
    job: RenderJob
    record: dict[str, str]  # what the output is made from; written into the MP4
    skip: bool  # the output exists and was made from exactly this record


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
    """JSON lines {audio, image?, prompt?, out}. Paths in the manifest are relative to its folder;
    the `image` default (--image) is used as given, i.e. relative to the working directory.
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
        if "image" in entry:
            if not isinstance(entry["image"], str) or not entry["image"]:
                raise UserError(f"{where}: 'image' must be a path string")
            img = base / entry["image"]
        elif image is not None:
            img = Path(image)
        else:
            raise UserError(f"{where}: 'image' is required (or pass --image as the default)")
        text = entry.get("prompt", prompt)
        if not isinstance(text, str):
            raise UserError(f"{where}: 'prompt' must be a string")
        jobs.append(RenderJob(base / entry["audio"], img, text, base / entry["out"], where))
    if not jobs:
        raise UserError(f"manifest {path} has no jobs")
    return jobs


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def job_record(job: RenderJob, *, model: str, seed: int, fit: str, dtype: str) -> dict[str, str]:
    """Everything the frames depend on (the streaming switches give the same frames, so they are
    not part of it). Input files are identified by their content."""
    return {
        "audio_sha256": file_sha256(job.audio), "image_sha256": file_sha256(job.image), "prompt": job.prompt,
        "seed": str(seed), "fit": fit, "model": model, "dtype": dtype,
    }


def encode_record(record: dict[str, str]) -> str:
    return RECORD_TAG + json.dumps(record, sort_keys=True)


def decode_record(comment: str | None) -> dict[str, str] | None:
    if not comment or not comment.startswith(RECORD_TAG):
        return None
    try:
        record = json.loads(comment[len(RECORD_TAG):])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _existing_output(planned_record: dict[str, str], out: Path) -> Literal["same"] | str:
    """'same' when `out` was rendered from `planned_record`, else why it may not be skipped."""
    old = decode_record(read_comment(out))
    if old is None:
        return (f"{out} exists and records no livetalk render inputs (another program's file, or an older "
                "version's): use --overwrite to replace it")
    changed = sorted(k.removesuffix("_sha256") for k in planned_record if old.get(k) != planned_record[k])
    if not changed:
        return "same"
    return f"{out} exists but was made from a different {', '.join(changed)}: use --overwrite to replace it"


def plan_jobs(
    jobs: list[RenderJob],
    *,
    record: Callable[[RenderJob], dict[str, str]],
    overwrite: bool,
    on_checked: Callable[[int, int], None] | None = None,
) -> list[PlannedJob]:
    """Check every job before the model loads; raise one UserError listing every bad job.

    Checked: outputs are distinct; audio decodes to samples; the image opens; the output's folder
    can be created and written; an existing output is this job's own finished result (skipped),
    or --overwrite is given.
    """
    problems: list[str] = []
    seen: dict[Path, int] = {}
    planned: list[PlannedJob] = []
    for i, job in enumerate(jobs):
        prefix = f"{job.where}: " if job.where else (f"job {i + 1}: " if len(jobs) > 1 else "")
        key = job.out.resolve()
        if key in seen:
            problems.append(f"{prefix}jobs {seen[key] + 1} and {i + 1} both write {job.out}")
            continue
        seen[key] = i
        try:
            check_input_file(job.audio, "audio")  # before it is hashed for the record
            load_image(job.image, 8, 8)
            rec = record(job)
            if job.out.is_dir():
                raise UserError(f"output {job.out} is a folder")
            skip = job.out.exists() and not overwrite
            if skip:
                state = _existing_output(rec, job.out)
                if state != "same":
                    raise UserError(state)
            else:
                load_audio(job.audio)  # decodes: a corrupt file is found now, not after the model loads
                check_writable(job.out)
            planned.append(PlannedJob(job, rec, skip))
        except UserError as e:
            problems.append(f"{prefix}{e}")
        except OSError as e:
            problems.append(f"{prefix}cannot read {job.audio}: {e.strerror or e}")
        if on_checked is not None:
            on_checked(i + 1, len(jobs))
    if problems:
        if len(jobs) == 1:
            raise UserError(problems[0])
        raise UserError(f"{len(problems)} of {len(jobs)} jobs have bad input (nothing was rendered):\n  "
                        + "\n  ".join(problems))
    return planned
