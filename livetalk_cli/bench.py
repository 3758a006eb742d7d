"""`livetalk bench`: steady-state FPS, first-frame latency, per-stage times, memory, FLOP floor.

What each figure means is the `livetalk bench --help` text (the command's docstring in cli.py).

Timing: the device is synchronised around every timed region (CUDA), warm-up is excluded, and each
figure is the median of `repeats` runs with min and max beside it. Per-stage times come from the
sequential eager path with a synchronisation after each stage (so they add up to more than a
pipelined block). The FLOP floor is the model's FLOPs per frame (`flops.FlopCount`: torch's counter for
matmuls and convolutions, attention counted from its shapes) over the device's measured matmul rate.

Nothing here needs PyAV: encode/mux timing is skipped when it is missing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livetalk_cli.errors import UserError
from livetalk_cli.pipeline import LoadedModel
from livetalk_cli.runtime.scheduler import stream_video
from livetalk_cli.runtime.stream import (
    AvatarStream,
    StreamOptions,
    block_video_range,
    blocks_for_video_frames,
    frames_to_uint8,
)

log = logging.getLogger(__name__)

# LiveTalk's published figures (arXiv 2512.23576): the GPU is not stated.
LIVETALK_REFERENCE = {"fps": 24.82, "first_frame_s": 0.33, "source": "LiveTalk (arXiv 2512.23576), GPU not stated"}


@dataclass(frozen=True)
class BenchSettings:
    height: int | None = None  # overrides of the model's config (None = the model's own)
    width: int | None = None
    steps: int | None = None
    block_frames: int | None = None
    sinks: int | None = None
    window: int | None = None
    blocks: int = 20  # measured blocks per FPS run
    warmup: int = 3  # blocks of each FPS run before timing starts
    repeats: int = 3
    stream_minutes: float = 10.0  # the memory-flatness stream (0 = skip)
    stage_blocks: int = 8  # blocks timed stage by stage
    compare: bool = False  # also measure every optimisation on/off
    speed_only: bool = False  # only FPS and first-frame latency (what --compare needs of each variant)
    background_load: int = 0  # busy processes during a second FPS/first-frame measurement (0 = none)

    def validate(self) -> None:
        if self.blocks < 20:
            raise UserError(f"--blocks must be at least 20 (steady state), got {self.blocks}")
        if self.warmup < 1 or self.repeats < 1 or self.stage_blocks < 1:
            raise UserError("--warmup, --repeats and --stage-blocks must be at least 1")
        if self.background_load < 0:
            raise UserError("--background-load must be >= 0")
        if self.stream_minutes < 0:
            raise UserError("--stream-minutes must be >= 0")
        for name in ("height", "width", "steps", "block_frames"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")
        for name in ("sinks", "window"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise UserError(f"--{name} must be >= 0, got {v}")


def configure(model: LoadedModel, s: BenchSettings) -> LoadedModel:
    """The model with the bench's resolution and stream overrides (weights do not depend on them)."""
    cfg = model.cfg
    stream = cfg.stream
    for field, value in (("num_steps", s.steps), ("block_frames", s.block_frames),
                         ("sink_frames", s.sinks), ("window_frames", s.window)):
        if value is not None:
            stream = dataclasses.replace(stream, **{field: value})
    stream.validate()
    height, width = s.height or cfg.height, s.width or cfg.width
    multiple = cfg.vae.spatial_factor * max(cfg.dit.patch_size[1:])
    if height % multiple or width % multiple:
        raise UserError(f"--height/--width must be multiples of {multiple} for {cfg.name}, got {height}x{width}")
    return dataclasses.replace(model, cfg=cfg.replace(height=height, width=width, stream=stream))


# --- timing helpers ------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def memory_mb(device: torch.device) -> float:
    """Memory in use now: CUDA allocated bytes, or this process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- inputs --------------------------------------------------------------------------------
def bench_inputs(model: LoadedModel, seconds: float) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Speech-like audio and a face from the synthetic world, at the model's size: (wave, image, prompt)."""
    from livetalk_cli.world.face import prompt_for, reference_image, sample_attributes, sample_identity
    from livetalk_cli.world.speech import synth_speech

    cfg = model.cfg
    sr = cfg.audio.sample_rate
    wave = synth_speech(np.random.default_rng([7, 2]), int(seconds * sr) + 1, sr)
    face = reference_image(sample_identity(np.random.default_rng([7, 0])), None, cfg.height, cfg.width)
    image = torch.from_numpy(face).permute(2, 0, 1).float() / 127.5 - 1.0
    prompt = prompt_for(sample_attributes(np.random.default_rng([7, 1])))
    return torch.from_numpy(wave.astype(np.float32)), image, prompt


def frames_of_blocks(n: int, stream: AvatarStream) -> int:
    """Video frames in blocks [0, n)."""
    return block_video_range(n - 1, stream.cfg.stream.block_frames, stream.tf)[1] if n else 0


# --- measurements --------------------------------------------------------------------------
def first_frame_latency(stream: AvatarStream, wave: torch.Tensor, image: torch.Tensor, prompt: str) -> float:
    """One stream start → the first generated frame on the host (seconds)."""
    device = stream.model.device
    synchronize(device)
    t0 = time.perf_counter()
    stream.start(image, prompt, seed=0)
    chunks = stream_video(stream, wave, 1)
    try:
        got = 0
        for chunk in chunks:
            got += len(frames_to_uint8(chunk))
            if got >= 2:  # frame 0 is the reference
                return time.perf_counter() - t0
    finally:
        chunks.close()
    raise RuntimeError("the first block produced no generated frame")


def steady_fps(stream: AvatarStream, wave: torch.Tensor, image: torch.Tensor, prompt: str, s: BenchSettings
               ) -> tuple[float, int]:
    """One stream of warmup + blocks blocks → (FPS over the measured blocks, frames measured)."""
    device = stream.model.device
    stream.start(image, prompt, seed=0)
    warm_end = frames_of_blocks(s.warmup, stream)
    total = frames_of_blocks(s.warmup + s.blocks, stream)
    got, t0 = 0, None
    for chunk in stream_video(stream, wave, s.warmup + s.blocks):
        got += len(frames_to_uint8(chunk))
        if t0 is None and got >= warm_end:
            synchronize(device)
            t0 = time.perf_counter()
    assert t0 is not None and got == total, (got, total)
    synchronize(device)
    return (total - warm_end) / (time.perf_counter() - t0), total - warm_end


class _PassTimer:
    """Forward hooks on the DiT: the wall time of every pass (device synchronised)."""

    def __init__(self, dit: torch.nn.Module, device: torch.device):
        self.device, self.times = device, []
        self._t0 = 0.0
        self._handles = [dit.register_forward_pre_hook(self._pre), dit.register_forward_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._t0)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def stage_times(model: LoadedModel, wave: torch.Tensor, image: torch.Tensor, prompt: str, s: BenchSettings,
                ) -> dict[str, dict[str, float]]:
    """Per-stage wall times per block on the sequential eager path (median over steady blocks)."""
    device, cfg = model.device, model.cfg
    stream = AvatarStream(model, StreamOptions(pipelined=False))
    stream.start(image, prompt, seed=0)
    k = cfg.stream.num_steps
    rows: dict[str, list[float]] = {"audio features": []}
    rows.update({f"denoise pass {i + 1}": [] for i in range(k)})
    rows.update({"refill (t=0 pass)": [], "VAE decode + to host": []})
    encode = importlib.util.find_spec("av") is not None
    if encode:
        rows["encode (H.264)"] = []

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        return out, time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        writer = None
        if encode:
            from livetalk_cli.mp4 import VideoWriter

            writer = VideoWriter(Path(tmp) / "bench.mp4", cfg.width, cfg.height, cfg.fps, audio=wave.numpy(),
                                 sample_rate=cfg.audio.sample_rate)
        timer = _PassTimer(model.dit, device)
        try:
            for n in range(s.warmup + s.stage_blocks):
                keep = n >= s.warmup
                timer.times.clear()
                audio, t_audio = timed(lambda: stream.block_audio(wave))
                x0, cond = stream.sample_block(audio)  # the render path's block, the passes timed by hooks
                video, t_decode = timed(lambda x0=x0: frames_to_uint8(torch.cat(list(stream.decode(x0)), dim=2)))
                stream.refill(x0, cond)
                if keep:
                    rows["audio features"].append(t_audio)
                    for i, t in enumerate(timer.times):
                        rows[f"denoise pass {i + 1}" if i < k else "refill (t=0 pass)"].append(t)
                    rows["VAE decode + to host"].append(t_decode)
                if writer is not None:
                    _, t_enc = timed(lambda video=video: writer.write(video))
                    if keep:
                        rows["encode (H.264)"].append(t_enc)
        finally:
            timer.close()
            if writer is not None:
                writer.abort()
    return {name: summary(v) for name, v in rows.items()}


def memory_stream(model: LoadedModel, options: StreamOptions, wave_fn: Callable[[int], torch.Tensor],
                  image: torch.Tensor, prompt: str, minutes: float,
                  on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Memory in use after every block of a `minutes`-long stream: is it flat?"""
    cfg = model.cfg
    stream = AvatarStream(model, options)
    frames_needed = int(minutes * 60 * cfg.fps)
    n_blocks = blocks_for_video_frames(frames_needed, cfg.stream.block_frames, stream.tf)
    wave = wave_fn(frames_needed)
    stream.start(image, prompt, seed=0)
    samples: list[float] = []
    got, blocks_done = 0, 0
    for chunk in stream_video(stream, wave, n_blocks):
        got += len(frames_to_uint8(chunk))
        if got >= frames_of_blocks(blocks_done + 1, stream):
            blocks_done += 1
            samples.append(memory_mb(model.device))
            if on_progress is not None:
                on_progress(blocks_done, n_blocks)
    return {"minutes": got / cfg.fps / 60, "blocks": n_blocks, **flatness(samples)}


def flatness(samples: list[float]) -> dict[str, Any]:
    """Is memory sampled over a stream flat? After the first 10 % (allocator warm-up), the median of
    the last quarter minus that of the first quarter, within max(16 MB, 2 %)."""
    settle = max(1, len(samples) // 10)
    steady = samples[settle:] or samples
    quarter = max(1, len(steady) // 4)  # medians of quarters: robust to the allocator's ups and downs
    start, end = statistics.median(steady[:quarter]), statistics.median(steady[-quarter:])
    tolerance = max(16.0, 0.02 * start)
    return {
        "start_mb": start, "end_mb": end, "min_mb": min(samples), "max_mb": max(samples),
        "growth_mb": end - start, "tolerance_mb": tolerance, "flat": abs(end - start) <= tolerance,
        "samples_mb": samples[:: max(1, len(samples) // 50)],
    }


def measure_variant(model: LoadedModel, options: StreamOptions, wave: torch.Tensor, image: torch.Tensor,
                    prompt: str, s: BenchSettings) -> dict[str, Any]:
    """FPS and first-frame latency of one set of switches (median of repeats, min/max)."""
    stream = AvatarStream(model, options)
    first_frame_latency(stream, wave, image, prompt)  # warm: compile, graphs, allocator, oneDNN plans
    steady_fps(stream, wave, image, prompt, dataclasses.replace(s, blocks=3, warmup=1))
    fps, latency = [], []
    for _ in range(s.repeats):
        latency.append(first_frame_latency(stream, wave, image, prompt))
        fps.append(steady_fps(stream, wave, image, prompt, s)[0])
    return {"options": options.label(), "fps": summary(fps), "first_frame_s": summary(latency)}


def run_bench(model: LoadedModel, options: StreamOptions, s: BenchSettings,
              on_status: Callable[[str], None] | None = None,
              on_progress: Callable[[int, int], None] | None = None,
              run_variant: Callable[[StreamOptions, str | None], dict[str, Any]] | None = None,
              engine_variants: list[str] | None = None) -> dict[str, Any]:
    """Every figure of `livetalk bench` as one JSON-able dict. `--compare` rows come from
    `run_variant(options, engine backend)` (the CLI: `variant_in_subprocess`): the switches, then
    with `--engine` one row per backend in `engine_variants`. Stage times and FLOPs are the eager
    model's (an engine's inside is not visible to hooks or counters)."""
    s.validate()
    model = configure(model, s)
    cfg, device = model.cfg, model.device
    status = on_status or (lambda _: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    blocks_needed = s.warmup + max(s.blocks, s.stage_blocks) + 2
    probe = AvatarStream(model)
    seconds = (frames_of_blocks(blocks_needed, probe) + probe.lookahead_frames + 1) / cfg.fps
    wave, image, prompt = bench_inputs(model, seconds)
    bf, tf = cfg.stream.block_frames, cfg.vae.temporal_factor

    result: dict[str, Any] = {
        "machine": {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
                    "python": platform.python_version(), "threads": torch.get_num_threads()},
        "model": {"name": cfg.name, "source": model.source, "dtype": str(model.dtype).replace("torch.", ""),
                  "vae_dtype": str(next(model.vae.parameters()).dtype).replace("torch.", ""),
                  "height": cfg.height, "width": cfg.width, "fps": cfg.fps, "steps": cfg.stream.num_steps,
                  "block_frames": bf, "sink_frames": cfg.stream.sink_frames,
                  "window_frames": cfg.stream.window_frames,
                  "dit_params": sum(p.numel() for p in model.dit.parameters())},
        "options": dataclasses.asdict(options),
        "settings": dataclasses.asdict(s),
        "latency_budget": {
            "audio_before_first_block_s": probe.audio_needed(0) / cfg.fps,
            "lookahead_s": probe.lookahead_frames / cfg.fps,
            "frames_per_block": tf * bf,
            "block_audio_s": tf * bf / cfg.fps,
        },
        "reference": LIVETALK_REFERENCE,
    }
    if model.engines is not None:
        e = model.engines
        result["engine"] = {"path": str(e.path), "dit": e.dit_backend, "vae": e.vae_backend}
    status(f"measuring {options.label()}: first frame and steady-state FPS")
    main = measure_variant(model, options, wave, image, prompt, s)
    result["fps"], result["first_frame_s"] = main["fps"], main["first_frame_s"]
    result["realtime_factor"] = main["fps"]["median"] / cfg.fps
    if s.background_load:
        from livetalk_cli.load import busy_processes

        status(f"measuring {options.label()} again beside {s.background_load} busy process(es)")
        with busy_processes(s.background_load):
            loaded = measure_variant(model, options, wave, image, prompt, s)
        result["loaded"] = {
            "busy_processes": s.background_load, "fps": loaded["fps"], "first_frame_s": loaded["first_frame_s"],
            "first_frame_vs_quiet": loaded["first_frame_s"]["median"] / main["first_frame_s"]["median"],
            "fps_vs_quiet": loaded["fps"]["median"] / main["fps"]["median"],
        }
    if s.speed_only:
        return result
    eager = dataclasses.replace(model, engines=None)
    status("per-stage times (sequential, eager, synchronised)")
    result["stages_s"] = stage_times(eager, wave, image, prompt, s)
    status("FLOPs and the device's matmul rate")
    from livetalk_cli.bench_floor import flops, matmul_rate

    fl = flops(eager, wave, image, prompt)
    rate = matmul_rate(device, model.dtype)
    per_frame = fl["dit_per_frame"] + fl["vae_decode_per_frame"]
    result["flops"] = {**fl, "matmul_flop_per_s": rate, "floor_fps": rate / per_frame,
                       "floor_first_frame_s": fl["first_frame"] / rate}
    if s.compare:
        if run_variant is None:
            raise UserError("--compare needs a way to run each variant (the CLI runs them in fresh processes)")
        from livetalk_cli.bench_compare import compare_rows

        result["compare"] = compare_rows(options, device, run_variant, engine_variants or [], status)
    if s.stream_minutes > 0:
        status(f"memory over a {s.stream_minutes:g}-minute stream")

        def long_wave(frames: int) -> torch.Tensor:
            sr = cfg.audio.sample_rate
            reps = -(-(frames + 2 * tf * bf) * sr // cfg.fps // len(wave))
            return wave.repeat(reps)

        result["memory_stream"] = memory_stream(model, options, long_wave, image, prompt, s.stream_minutes,
                                                on_progress)
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["peak_memory_kind"] = "CUDA allocated" if device.type == "cuda" else "process max RSS"
    return result
