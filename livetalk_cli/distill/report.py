"""The distillation report: ground truth vs teacher vs ODE-init student vs DMD student on held-out
world clips, FLOPs, first-frame latency, identity sinks over a long stream, render speed.

Methods (also written into the report):
* Held-out clips: world seeds `heldout_seed + i`, the recipe's clip length, frame 0 = reference.
  Each model sees the clip's reference image, prompt and audio; the metrics (world/metrics.py)
  compare its frames with the clip's audio and reference. Means with a 95 % interval
  (mean +- 1.96 sd / sqrt(n)).
* VAE round trip: the clip encoded and decoded by the run's VAE, about the ceiling of every model
  that works in its latent space. VAE stream: held-out 16-s streams encoded in clip-length chunks
  (the latents the DiT learns) and decoded block by block as `livetalk render` does, with and
  without the model's identity anchor (`stream.vae_anchor_every`); mean |decoded - true| (0..255)
  over the first and the last second (a drifting decoder shows last >> first).
* Teacher: bidirectional, `trajectories.num_steps` Euler steps with CFG (2 forwards per step),
  whole clip decoded at once. Students: the streaming path `livetalk render` uses (4 steps + refill
  per 3-latent block, KV cache with identity sinks, streaming VAE with the model's anchor).
* DiT FLOPs per generated frame: `flops.FlopCount` (torch's FlopCounterMode for matmuls and convolutions,
  attention counted from its shapes, which torch's counter misses on CPU) over the real calls
  (teacher: one forward x 2 x steps / video frames of the clip; student: one steady-state block
  (cache full) / its video frames). VAE decode FLOPs per frame separately.
* First-frame latency (this machine): from the call that starts generation (models loaded) to the
  first generated frame on the host. Teacher: the whole sampling + decoding the clip; student: the
  `livetalk render` pipeline (`stream_video`), stream start + block 0 + the decode of its first
  chunk.
* Long streams and sinks: `long_streams.py` (minute-long streams per 10-s window for ground truth,
  the VAE alone and each student; the final student with and without sinks over longer streams).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livetalk_cli.distill.context import StageContext
from livetalk_cli.distill.data import clip_audio_features, video_tensor, world_clip
from livetalk_cli.distill.flow import FlowModel
from livetalk_cli.distill.long_streams import ci95, long_stream_study, sink_study
from livetalk_cli.distill.long_streams import markdown as long_markdown
from livetalk_cli.distill.vae_stage import roundtrip_frames, stream_decode_error
from livetalk_cli.files import write_text_atomic
from livetalk_cli.flops import FlopCount
from livetalk_cli.models.dit import WanDiT
from livetalk_cli.pipeline import LoadedModel, load_model
from livetalk_cli.runtime.scheduler import stream_video
from livetalk_cli.runtime.stream import AvatarStream, blocks_for_video_frames, frames_to_uint8
from livetalk_cli.sampling.teacher import teacher_sample
from livetalk_cli.world.metrics import evaluate_video

METRICS = ("lip_sync_corr", "lip_sync_offset", "identity_error", "flicker", "black_frames", "frozen_frames")


def stream_frames(model: LoadedModel, reference: np.ndarray, prompt: str, audio: np.ndarray, num_frames: int,
                  seed: int) -> tuple[np.ndarray, float]:
    """Stream a clip the way `livetalk render` does (`stream_video`, pipelined) → (frames
    (T,H,W,3) uint8, seconds from stream start to the first generated frame on the host)."""
    stream = AvatarStream(model)
    wave = torch.from_numpy(audio)
    blocks = blocks_for_video_frames(num_frames, model.cfg.stream.block_frames, stream.tf)
    t0 = time.perf_counter()
    stream.start(video_tensor(reference[None])[:, 0], prompt, seed)
    out: list[np.ndarray] = []
    first = None
    for chunk in stream_video(stream, wave, blocks):
        out.append(frames_to_uint8(chunk))
        if first is None and sum(len(f) for f in out) >= 2:  # frame 0 is the reference
            first = time.perf_counter() - t0
    stream.close()
    return np.concatenate(out)[:num_frames], float(first if first is not None else "nan")


@torch.no_grad()
def teacher_frames(model: LoadedModel, teacher: WanDiT, clip: Any, num_frames: int, seed: int, steps: int,
                   shift: float, guidance: float) -> tuple[np.ndarray, float]:
    cfg = model.cfg
    t0 = time.perf_counter()
    flow = FlowModel(teacher)
    ref = model.vae.encode_reference(video_tensor(clip.reference[None])[None], cfg.still_reference_latents).float()
    audio = clip_audio_features(model.audio_encoder, cfg, clip.audio, num_frames)[None]
    context = model.text_encoder([clip.prompt])
    f = 1 + (num_frames - 1) // cfg.vae.temporal_factor
    h, w = cfg.latent_hw
    noise = torch.randn((1, cfg.dit.out_dim, f, h, w), generator=torch.Generator().manual_seed(seed))
    cond = flow.conditioning(context, audio, ref, f)
    uncond = flow.conditioning(model.text_encoder([""]), torch.zeros_like(audio), ref, f)
    x0, _ = teacher_sample(teacher, noise, cond, uncond, num_steps=steps, shift=shift, guidance=guidance, ref=ref)
    frames = frames_to_uint8(model.vae.decode(x0))
    return frames[:num_frames], time.perf_counter() - t0


def _frames_only(*args: Any) -> np.ndarray:
    return stream_frames(*args)[0]


def dit_flops(fn: Any) -> int:
    with FlopCount() as counter:
        fn()
    return counter.total


@torch.no_grad()
def flops_per_frame(model: LoadedModel, teacher: WanDiT, clip_frames: int, steps: int) -> dict[str, float]:
    cfg = model.cfg
    tf, bf = cfg.vae.temporal_factor, cfg.stream.block_frames
    f = 1 + (clip_frames - 1) // tf
    h, w = cfg.latent_hw
    flow = FlowModel(teacher)
    x = torch.zeros(1, cfg.dit.out_dim, f, h, w)
    args = (torch.zeros(1, f), torch.zeros(1, cfg.dit.text_len, cfg.dit.text_dim),
            torch.zeros(1, clip_frames, cfg.dit.audio_dim), x[:, :, :1])
    teacher_fwd = dit_flops(lambda: flow(x, *args))
    # Student: fill the cache (sinks + window) first, then count one steady-state block.
    stream = AvatarStream(model)
    stream.start(torch.zeros(3, cfg.height, cfg.width), "", 0)
    wave = torch.zeros(cfg.audio.sample_rate * 60)
    warm = (cfg.stream.sink_frames + cfg.stream.window_frames) // bf + 1
    for _ in range(warm):
        stream.next_block(wave)
    noise = torch.zeros(cfg.stream.num_steps, 1, cfg.dit.out_dim, bf, h, w)
    audio = torch.zeros(cfg.dit.num_audio_layers, 1, bf, cfg.dit.dim)
    student_block = dit_flops(lambda: stream.sampler.denoise_block(noise, audio))
    every = max(1, cfg.stream.vae_anchor_every)  # blocks per anchor: its decode is shared among them

    def vae_blocks() -> None:
        for _ in range(every):
            stream.vae_side.begin_block()
            stream.vae_side.decode(torch.zeros(1, cfg.dit.out_dim, bf, h, w))

    vae_block = dit_flops(vae_blocks) / every
    return {
        "teacher_dit_per_frame": teacher_fwd * 2 * steps / clip_frames,
        "student_dit_per_frame": student_block / (tf * bf),
        "vae_decode_per_frame": vae_block / (tf * bf),
        "teacher_forward": teacher_fwd,
        "student_block": student_block,
    }


def render_speed(model: LoadedModel, ctx: StageContext, seconds: float) -> dict[str, float]:
    from PIL import Image

    from livetalk_cli.media import write_wav
    from livetalk_cli.render import RenderJob, render_job

    cfg = model.cfg
    clip = world_clip(cfg, ctx.recipe.world.heldout_seed + 800_000, int(seconds * cfg.fps))
    with tempfile.TemporaryDirectory() as tmp:
        wav, png = Path(tmp) / "a.wav", Path(tmp) / "ref.png"
        write_wav(wav, clip.audio, cfg.audio.sample_rate)
        Image.fromarray(clip.reference).save(png)
        render_job(model, RenderJob(wav, png, clip.prompt, Path(tmp) / "warm.mp4"))  # warm-up
        result = render_job(model, RenderJob(wav, png, clip.prompt, Path(tmp) / "out.mp4"))
    return {"audio_s": result.audio_s, "wall_s": result.wall_s, "realtime_factor": result.realtime_factor}


def build_report(ctx: StageContext, out_dir: Path, *, clips: int = 64, stream_seconds: float = 60.0,
                 identities: int = 16, sink_seconds: float = 300.0, sink_identities: int = 8,
                 speed_seconds: float = 10.0, vae_stream_frames: int = 257) -> dict[str, Any]:
    """Evaluate every model the run produced; write report.json and report.md under `out_dir`."""
    r = ctx.recipe
    torch.manual_seed(0)
    students = {name: load_model(checkpoint=ctx.out / folder, device="cpu", dtype="float32")
                for name, folder in (("ode_init", "student_ode_init"), ("dmd", "student"))
                if (ctx.out / folder / "config.json").is_file()}
    if not students:
        raise FileNotFoundError(f"{ctx.out}: no student checkpoints yet (run the ode_init/dmd stages)")
    base = next(iter(students.values()))
    teacher = ctx.load_dit("teacher").eval().requires_grad_(False)
    cfg, tr = base.cfg, r.trajectories
    frames_n = r.world.clip_frames
    rows: dict[str, dict[str, list[float]]] = {k: {m: [] for m in METRICS}
                                               for k in ("ground_truth", "vae_roundtrip", "teacher", *students)}
    latency: dict[str, list[float]] = {k: [] for k in ("teacher", *students)}
    for i in range(clips):
        clip = world_clip(cfg, r.world.heldout_seed + i, frames_n)
        outputs = {"ground_truth": clip.frames, "vae_roundtrip": roundtrip_frames(base.vae, clip.frames)}
        outputs["teacher"], lat = teacher_frames(base, teacher, clip, frames_n, i, tr.num_steps, tr.shift, tr.guidance)
        latency["teacher"].append(lat)
        for name, model in students.items():
            outputs[name], lat = stream_frames(model, clip.reference, clip.prompt, clip.audio, frames_n, i)
            latency[name].append(lat)
        for name, frames in outputs.items():
            res = evaluate_video(frames, clip.audio, cfg.audio.sample_rate, cfg.fps, clip.reference)
            for m in METRICS:
                rows[name][m].append(float(res[m]))
        ctx.progress("report: clips", i + 1, clips)
    report: dict[str, Any] = {
        "run": str(ctx.out), "clips": clips, "clip_frames": frames_n, "fps": cfg.fps,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "models": {k: {m: ci95(v) for m, v in d.items()} for k, d in rows.items()},
        "first_frame_latency_s": {k: ci95(v) for k, v in latency.items()},
    }
    ctx.progress("report: vae stream", 0, 1)
    sc = cfg.stream
    report["vae_stream"] = {
        "anchored": stream_decode_error(base.vae, ctx, 4, vae_stream_frames, sc),
        "plain": stream_decode_error(base.vae, ctx, 4, vae_stream_frames, dataclasses.replace(sc, vae_anchor_every=0)),
    } if vae_stream_frames else {}
    ctx.progress("report: flops", 0, 1)
    report["flops"] = flops_per_frame(base, teacher, frames_n, tr.num_steps)
    final = students.get("dmd", base)
    if stream_seconds > 0 and identities > 0:
        ctx.progress("report: long streams", 0, 1)
        name = "dmd" if "dmd" in students else "ode_init"
        report["long_streams"] = long_stream_study({name: final}, ctx, _frames_only, seconds=stream_seconds,
                                                   identities=identities)
    if sink_seconds > 0 and sink_identities > 0:
        ctx.progress("report: sinks", 0, 1)
        report["sinks"] = sink_study(final, ctx, _frames_only, seconds=sink_seconds, identities=sink_identities)
    if speed_seconds > 0:
        report["render_speed"] = render_speed(final, ctx, speed_seconds)
    report["targets"] = targets(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=1))
    write_text_atomic(out_dir / "report.md", markdown(report))
    return report


def targets(rep: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with its measured ratio and whether it is met."""
    m = rep["models"]

    def mean(name: str, metric: str) -> float:
        return m[name][metric]["mean"] if name in m else float("nan")

    out: dict[str, Any] = {}
    out["teacher_lipsync_vs_gt"] = mean("teacher", "lip_sync_corr") / mean("ground_truth", "lip_sync_corr")
    if "dmd" in m:
        out["dmd_lipsync_vs_teacher"] = mean("dmd", "lip_sync_corr") / mean("teacher", "lip_sync_corr")
    if "dmd" in m and "ode_init" in m:
        out["dmd_beats_ode_lipsync"] = mean("dmd", "lip_sync_corr") > mean("ode_init", "lip_sync_corr")
        out["dmd_beats_ode_flicker"] = mean("dmd", "flicker") < mean("ode_init", "flicker")
    fl = rep["flops"]
    out["dit_flops_ratio"] = fl["teacher_dit_per_frame"] / fl["student_dit_per_frame"]
    lat = rep["first_frame_latency_s"]
    student = "dmd" if "dmd" in lat else "ode_init"
    out["first_frame_latency_ratio"] = lat["teacher"]["mean"] / lat[student]["mean"]
    long = rep.get("long_streams", {}).get("rows", {})
    student = "dmd" if "dmd" in long else "ode_init" if "ode_init" in long else None
    if student is not None:
        wins = long[student]["windows"]
        out["long_min_window_lipsync"] = min(w["lip_sync_corr"]["mean"] for w in wins)
        out["long_min_window_offset_within_1"] = min(w["offset_within_1"] for w in wins)
        drift = long[student]["drift_per_min"]
        out["long_identity_drift_per_min"] = drift["mean"] if drift else float("nan")
        out["long_max_window_flicker"] = max(w["flicker"]["mean"] for w in wins)
    if "sinks" in rep:
        g = rep["sinks"]["paired_gain"]["identity_error"]
        out["sinks_paired_identity_gain_ci95_above_0"] = g["mean"] - g["ci95"] > 0
    return out


def markdown(rep: dict[str, Any]) -> str:
    lines = [
        "# Distillation report", "",
        f"Run `{rep['run']}`; {rep['clips']} held-out world clips of {rep['clip_frames']} frames at "
        f"{rep['fps']} fps; machine: {rep['machine']['cpu']}, {rep['machine']['threads']} threads, "
        f"torch {rep['machine']['torch']}. Means with 95 % intervals. Methods: "
        "`livetalk_cli/distill/report.py` and `livetalk_cli/world/metrics.py`.", "",
        "| model | lip-sync corr | best offset | identity error | flicker | black | frozen | first frame (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lat = rep["first_frame_latency_s"]
    for name, d in rep["models"].items():
        cells = [f"{d[m]['mean']:.3f} ± {d[m]['ci95']:.3f}" for m in METRICS]
        first = f"{lat[name]['mean']:.3f}" if name in lat else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {first} |")
    if rep.get("vae_stream"):
        lines += ["", "| VAE stream (0..255 error) | first second | last second | all |", "|---|---|---|---|"]
        for name, d in rep["vae_stream"].items():
            how = (f"anchor every {d['anchor_every']} blocks, history {d['history']}, fade {d.get('fade', 0)}"
                   if d["anchor_every"] else "no anchor")
            lines.append(f"| {name} ({how}; {d['clips']} streams of {d['frames']} frames) | {d['first_s']:.1f} | "
                         f"{d['last_s']:.1f} | {d['all']:.1f} |")
    fl = rep["flops"]
    lines += ["", "| DiT FLOPs per frame | value |", "|---|---|",
              f"| teacher | {fl['teacher_dit_per_frame'] / 1e9:.2f} GFLOP |",
              f"| student | {fl['student_dit_per_frame'] / 1e9:.3f} GFLOP |",
              f"| VAE decode (separate; the anchor's share included) | {fl['vae_decode_per_frame'] / 1e9:.3f} GFLOP |"]
    lines += long_markdown(rep.get("long_streams"), rep.get("sinks"))
    if "render_speed" in rep:
        rs = rep["render_speed"]
        lines += ["", f"Render speed: {rs['audio_s']:.1f} s of audio in {rs['wall_s']:.2f} s = "
                  f"**{rs['realtime_factor']:.2f}x real time**."]
    lines += ["", "## Targets", ""]
    lines += [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in rep["targets"].items()]
    return "\n".join(lines) + "\n"
