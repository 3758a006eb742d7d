"""`livetalk prepare`: real talking-head videos → the latent shards `distill` reads (`world.latents`).

Clips come from `prepare_media.py`; each is encoded as the world's clips are (`distill/data.py`):
VAE latents of the clip with its reference image as frame 0, the audio encoder's features of its
audio, the still-reference latents for models that use them, the prompt in the shard's metadata.
Real faces have no `mouth` map (the world's is found by colour), so recipes on prepared data use
`mouth_weight: 0`.

The clips are numbered in order (videos as given, clips in time) and shard k holds clips
[64k, 64k + 64). `OUT/manifest.json` records every video's clip count (or why it was skipped) and is
rewritten after each shard. A shard stores where each of its clips came from and the settings it was
made with, so a rerun keeps every shard that still matches and encodes the rest; a shard is written
to a temporary file and renamed, so an interrupted run never leaves half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from livetalk_cli.config import ModelConfig
from livetalk_cli.distill.data import SHARD, clip_audio_features, video_tensor
from livetalk_cli.errors import MediaError, UserError
from livetalk_cli.files import atomic_path, save_safetensors_atomic
from livetalk_cli.models.audio import AudioFeatureEncoder
from livetalk_cli.models.vae import WanVAE
from livetalk_cli.prepare_media import Clip, Framing, Probe, pick_reference, probe, read_clips, with_reference

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Source:
    """One input video and what it says about itself."""

    path: Path
    prompt: str
    box: tuple[int, int, int, int] | None = None

    def key(self) -> dict[str, Any]:
        st = self.path.stat()
        return {"path": str(self.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "prompt": self.prompt, "box": list(self.box) if self.box else None}


@dataclass
class Summary:
    clips: int = 0
    shards: int = 0
    encoded: int = 0  # clips encoded by this run (the rest were in shards kept)
    skipped: dict[str, str] = field(default_factory=dict)  # video -> why
    failed: dict[str, str] = field(default_factory=dict)  # video -> the read error


def settings_id(framing: Framing, encoders: str, still_reference: int) -> str:
    text = json.dumps({"framing": asdict(framing), "encoders": encoders, "still_reference": still_reference},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(sources: list[Source], framing: Framing, out: Path, workers: int) -> dict[str, Probe | MediaError]:
    """Every video's clip count, from the manifest where the file is unchanged, else probed."""
    old = _read_manifest(out).get("videos", {})
    fr = asdict(framing)

    def one(src: Source) -> Probe | MediaError:
        rec = old.get(str(src.path))
        if rec and rec.get("key") == src.key() and rec.get("framing") == fr and rec.get("error") is None:
            return Probe(rec["frames"], rec["clips"], rec.get("reason"))
        try:
            return probe(src.path, framing)
        except MediaError as e:
            return e

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(zip([str(s.path) for s in sources], pool.map(one, sources), strict=True))


@torch.no_grad()
def prepare(sources: list[Source], out: Path, *, framing: Framing, vae: WanVAE, encoder: AudioFeatureEncoder,
            encoders: str, cfg: ModelConfig, workers: int = 1,
            on_plan: Callable[[int, int], None] | None = None,
            on_clip: Callable[[], None] | None = None) -> Summary:
    """Encode every clip of `sources` into OUT's shards (resuming); see the module docstring."""
    out.mkdir(parents=True, exist_ok=True)
    sid = settings_id(framing, encoders, cfg.still_reference_latents)
    probes = plan(sources, framing, out, workers)
    summary = Summary()
    clips: list[tuple[Source, int]] = []  # (source, clip number) per global clip
    for src in sources:
        p = probes[str(src.path)]
        if isinstance(p, MediaError):
            summary.failed[str(src.path)] = str(p)
        elif p.reason:
            summary.skipped[str(src.path)] = p.reason
        else:
            clips += [(src, i) for i in range(p.clips)]
    summary.clips = len(clips)
    summary.shards = -(-len(clips) // SHARD)
    if not clips:
        _write_manifest(out, sources, probes, framing, sid, 0)
        return summary
    wanted = {k: [_clip_source(*clips[i]) for i in range(k * SHARD, min((k + 1) * SHARD, len(clips)))]
              for k in range(summary.shards)}
    todo = {k for k in wanted if not _shard_matches(out / f"shard_{k:05d}.safetensors", wanted[k], sid)}
    if on_plan:
        on_plan(sum(len(wanted[k]) for k in todo), len(clips))
    for k in sorted(set(wanted) - todo):
        log.info("shard %d kept", k)
    for stale in sorted(out.glob("shard_*.safetensors")):  # shards past the end: from more clips before
        if int(stale.stem.split("_")[1]) >= summary.shards:
            stale.unlink()
    rows: dict[int, list[dict[str, Any]]] = {k: [] for k in todo}
    g = 0
    jobs = []
    for src in sources:
        p = probes[str(src.path)]
        if isinstance(p, MediaError) or p.reason:
            continue
        first = next((i for i in range(p.clips) if (g + i) // SHARD in todo), None)
        if first is not None:
            jobs.append((src, p.frames, first, g))
        g += p.clips
    for src, g0, clip in _clips_in_order(jobs, framing, workers):
        k = (g0 + clip.index) // SHARD
        if k not in todo:
            continue
        rows[k].append(_encode(clip, src, framing, vae, encoder, cfg))
        summary.encoded += 1
        if on_clip:
            on_clip()
        if len(rows[k]) == len(wanted[k]):
            _write_shard(out / f"shard_{k:05d}.safetensors", k, rows.pop(k), sid)
            _write_manifest(out, sources, probes, framing, sid, summary.shards)
    if rows:  # a video changed between the plan and its reading
        raise MediaError("a video yielded fewer clips than planned (did it change?): run prepare again")
    _write_manifest(out, sources, probes, framing, sid, summary.shards)
    return summary


def _clips_in_order(jobs: list[tuple[Source, int, int, int]], framing: Framing,
                    workers: int) -> Iterator[tuple[Source, int, Clip]]:
    """(source, its first global clip number, clip) for every job's clips, in order; up to `workers`
    videos are decoded at once, each a few clips ahead of the encoder."""
    if workers <= 1:
        for src, frames, first, g0 in jobs:
            for clip in read_clips(src.path, framing, frames, box=src.box, first_clip=first):
                yield src, g0, clip
        return
    queues: list[queue.Queue] = [queue.Queue(maxsize=2) for _ in jobs]
    stop = threading.Event()

    def put(q: queue.Queue, item: object) -> bool:
        """Hand `item` over unless the consumer has stopped (False)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def run(i: int) -> None:
        src, frames, first, _ = jobs[i]
        try:
            for clip in read_clips(src.path, framing, frames, box=src.box, first_clip=first):
                if not put(queues[i], clip):
                    return
            put(queues[i], None)
        except BaseException as e:  # handed to the consumer, which raises it in order
            put(queues[i], e)

    with ThreadPoolExecutor(workers) as pool:
        try:
            for i in range(len(jobs)):
                pool.submit(run, i)
            for i, (src, _, _, g0) in enumerate(jobs):
                while (item := queues[i].get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield src, g0, item
        finally:
            stop.set()


def _encode(clip: Clip, src: Source, framing: Framing, vae: WanVAE, encoder: AudioFeatureEncoder,
            cfg: ModelConfig) -> dict[str, Any]:
    ref = pick_reference(clip.frames)
    frames = with_reference(clip.frames, ref)
    param = next(vae.parameters())
    device, dtype = param.device, param.dtype
    row: dict[str, Any] = {
        "latents": vae.encode(video_tensor(frames)[None].to(device, dtype)).float().cpu(),
        "audio": clip_audio_features(encoder, cfg, clip.audio, framing.clip_frames),
        "source": _clip_source(src, clip.index),
        "prompt": src.prompt,
        "reference_frame": ref,
    }
    if cfg.still_reference_latents:
        image = video_tensor(frames[:1])[None].to(device, dtype)
        row["reference"] = vae.encode_reference(image, cfg.still_reference_latents).float().cpu()
    return row


def _clip_source(src: Source, index: int) -> dict[str, Any]:
    return {**src.key(), "clip": index}


def _write_shard(path: Path, k: int, rows: list[dict[str, Any]], sid: str) -> None:
    tensors = {
        "latents": torch.cat([r["latents"] for r in rows]).half().contiguous(),
        "audio": torch.stack([r["audio"] for r in rows]).half().contiguous(),
        "index": torch.arange(k * SHARD, k * SHARD + len(rows)),  # the clips' numbers
        "reference_frame": torch.tensor([r["reference_frame"] for r in rows]),
    }
    if "reference" in rows[0]:
        tensors["reference"] = torch.cat([r["reference"] for r in rows]).half().contiguous()
    metadata = {"prompts": json.dumps([r["prompt"] for r in rows]), "prepare": sid,
                "sources": json.dumps([r["source"] for r in rows])}
    save_safetensors_atomic(tensors, path, metadata=metadata)
    log.info("wrote %s (%d clips)", path, len(rows))


def _shard_matches(path: Path, sources: list[dict[str, Any]], sid: str) -> bool:
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # an unreadable shard is made again
        return False
    return meta.get("prepare") == sid and json.loads(meta.get("sources", "null")) == sources


def _read_manifest(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(out: Path, sources: list[Source], probes: dict[str, Probe | MediaError], framing: Framing,
                    sid: str, shards: int) -> None:
    videos: dict[str, Any] = {}
    for src in sources:
        p = probes[str(src.path)]
        rec: dict[str, Any] = {"key": src.key(), "framing": asdict(framing)}
        if isinstance(p, MediaError):
            rec["error"] = str(p)
        else:
            rec.update(frames=p.frames, clips=p.clips, reason=p.reason)
        videos[str(src.path)] = rec
    data = {"format": "livetalk-latents", "version": 1, "settings": sid, "framing": asdict(framing),
            "clips": sum(v.get("clips", 0) for v in videos.values()), "shards": shards, "videos": videos}
    with atomic_path(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def read_captions(path: Path | None) -> dict[str, dict[str, Any]]:
    """A manifest of videos: JSON lines `{"video": PATH, "prompt": TEXT, "box": [x, y, w, h]}`
    (prompt and box optional; relative paths from the manifest's folder)."""
    if path is None:
        return {}
    entries: dict[str, dict[str, Any]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read the manifest {path}: {e.strerror or e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            video = Path(entry["video"])
            box = entry.get("box")
            if box is not None and (len(box) != 4 or not all(isinstance(v, int) for v in box)):
                raise ValueError("box must be four integers [x, y, w, h]")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{n}: not a manifest line ({e})") from e
        video = video if video.is_absolute() else path.parent / video
        entries[str(video.resolve())] = {"video": video, "prompt": entry.get("prompt"), "box": box}
    return entries


def sources_for(videos: list[Path], manifest: dict[str, dict[str, Any]], default_prompt: str) -> list[Source]:
    """Each video with its prompt (the manifest's, a sidecar VIDEO.txt, or the default) and box."""
    out = []
    for v in videos:
        entry = manifest.get(str(v.resolve()), {})
        prompt = entry.get("prompt")
        sidecar = v.with_suffix(".txt")
        if prompt is None and sidecar.is_file():
            prompt = " ".join(sidecar.read_text(errors="replace").split())
        box = tuple(entry["box"]) if entry.get("box") else None
        out.append(Source(v, prompt or default_prompt, box))  # type: ignore[arg-type]
    return out
