"""`livetalk bench --serve`: serve-local measured through its WebSocket API with the package's client.

A server runs in this process on a loopback port (`serve_in_thread`); clients speak the synthetic
world's speech to it (echo responder: the avatar says what it hears).

- Latency of a turn, two ways of sending it: `file` (the whole turn at once, as an agent's TTS
  reply) and `mic` (100 ms chunks in real time, as a microphone). Measured per turn: *received*,
  from the moment its audio was sent (file) or its first sample was sent (mic) to the arrival of the
  first frame that shows it; *mouth-to-ear*, to when a player that shows frames at the preset's fps
  from frame 0 (waiting when a frame is late) shows that frame.
- Sessions at once: n sessions started together, each streaming speech in real time; per session,
  after the first 3 s (the starts and first blocks), the frames that arrived per second and the
  player's stall time. Real time: every session's player stalls under 2 % of that time.
- Memory: one session for `minutes`, turns and silences alternating; the process's resident set
  every few seconds, flat by the rule `livetalk bench` uses for streams.
"""

from __future__ import annotations

import io
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from livetalk_cli.bench import bench_inputs, flatness, memory_mb
from livetalk_cli.pipeline import LoadedModel

REALTIME_STALL = 0.02  # a session is real time when its player stalls less than this fraction
WARMUP_S = 3.0  # sessions at once: what comes after this many seconds of speech is measured


def _png(image: torch.Tensor) -> bytes:
    arr = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def player_times(arrivals: dict[int, float], fps: int) -> dict[int, float]:
    """When a player that starts at frame 0's arrival, shows a frame every 1/fps and waits for late
    frames shows each frame (arrival times in; frames must be numbered 0..n-1)."""
    shown: dict[int, float] = {}
    t = None
    for f in sorted(arrivals):
        t = arrivals[f] if t is None else max(arrivals[f], t + 1 / fps)
        shown[f] = t
    return shown


def stall_s(arrivals: dict[int, float], fps: int, since: int = 0) -> float:
    """Seconds the player waited for late frames, from frame `since` on."""
    shown = player_times(arrivals, fps)
    frames = [f for f in sorted(shown) if f >= since]
    if len(frames) < 2:
        return 0.0
    return (shown[frames[-1]] - shown[frames[0]]) - (frames[-1] - frames[0]) / fps


def _summary(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"median": statistics.median(v), "p95": v[min(len(v) - 1, round(0.95 * (len(v) - 1)))],
            "min": v[0], "max": v[-1], "n": len(v)}


def turn_latency(url: str, face: bytes, wave: np.ndarray, fps: int, rate: int, turns: int, mode: str,
                 rng: np.random.Generator) -> dict[str, Any]:
    from livetalk_cli.serve.client import AvatarClient

    spf = rate // fps
    received, heard = [], []
    with AvatarClient.connect(url) as c:
        c.start(face, video="jpeg", decode=False)
        c.wait_frames(1)
        for k in range(1, turns + 1):
            time.sleep(float(rng.uniform(1.0, 2.0)))  # the avatar idles between turns
            length = int(rng.uniform(1.0, 2.0) * rate)
            start = int(rng.integers(0, len(wave) - length))
            turn = wave[start: start + length]
            sent = time.monotonic()
            if mode == "file":
                c.send_pcm(turn, chunk_s=length / rate)
            else:
                c.send_pcm(turn, chunk_s=0.1, realtime=True)
            c.end_turn()
            frame = c.wait_event("turn_started", turn=k, timeout=60)["frame"]
            c.wait_event("turn_ended", turn=k, timeout=60)
            c.wait_frames(frame + 1)
            # mic: the turn's first sample was sent at `sent`; its frame shows it
            received.append(c.frame_times[frame] - sent)
            heard.append(player_times(c.frame_times, fps)[frame] - sent)
        assert spf > 0
    return {"mode": mode, "turns": turns, "received_s": _summary(received), "mouth_to_ear_s": _summary(heard)}


def sessions_at_once(url: str, face: bytes, wave: np.ndarray, fps: int, rate: int, n: int,
                     seconds: float) -> dict[str, Any]:
    from livetalk_cli.serve.client import AvatarClient

    results: list[dict[str, float]] = []
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            with AvatarClient.connect(url) as c:
                c.start(face, video="jpeg", decode=False, seed=i)
                c.wait_frames(1, timeout=60)
                t0 = time.monotonic()
                offset = (i * rate * 7) % max(1, len(wave) - int(seconds * rate))
                c.send_pcm(wave[offset: offset + int(seconds * rate)], chunk_s=0.1, realtime=True)
                elapsed = time.monotonic() - t0
                warm = t0 + WARMUP_S  # sustained: after the sessions' starts and first blocks
                got = [f for f, t in c.frame_times.items() if warm <= t <= t0 + elapsed]
                results.append({"fps": len(got) / max(1e-9, elapsed - WARMUP_S), "seconds": elapsed - WARMUP_S,
                                "stall_s": stall_s(c.frame_times, fps, since=min(got, default=0))})
        except Exception as e:  # a refused or failed session is a result, not a crash
            errors.append(f"{type(e).__name__}: {e}")

    workers = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    worst = max((r["stall_s"] / r["seconds"] for r in results), default=1.0)
    return {"sessions": n, "fps": [round(r["fps"], 2) for r in results],
            "stall_s": [round(r["stall_s"], 3) for r in results], "errors": errors,
            "realtime": not errors and len(results) == n and worst < REALTIME_STALL}


def long_session(url: str, face: bytes, wave: np.ndarray, rate: int, minutes: float,
                 device: torch.device, on_progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    from livetalk_cli.serve.client import AvatarClient

    samples: list[float] = []
    total = minutes * 60
    with AvatarClient.connect(url) as c:
        c.start(face, video="jpeg", decode=False, keep=64)
        t0 = time.monotonic()
        k = 0
        while (now := time.monotonic()) - t0 < total:
            if k % 2 == 0:  # a 3-s turn, then 3 s of silence
                start = (k * rate) % (len(wave) - 3 * rate)
                c.send_pcm(wave[start: start + 3 * rate], chunk_s=0.1, realtime=True)
                c.end_turn()
            else:
                time.sleep(3.0)
            k += 1
            samples.append(memory_mb(device))
            if on_progress is not None:
                on_progress(int(now - t0), int(total))
        frames = c.received
    return {"minutes": minutes, "frames": frames, **flatness(samples)}


def run_serve_bench(model: LoadedModel, *, max_sessions: int = 4, seconds: float = 20.0, turns: int = 8,
                    minutes: float = 10.0, threads: int | None = None, on_status: Callable[[str], None] | None = None,
                    on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    from livetalk_cli.bench import device_name
    from livetalk_cli.serve.app import ServerConfig, serve_in_thread
    from livetalk_cli.serve.protocol import Limits

    cfg = model.cfg
    fps, rate = cfg.fps, cfg.audio.sample_rate
    wave_t, image, _ = bench_inputs(model, 120.0)
    wave, face = wave_t.numpy(), _png(image)
    status = on_status or (lambda _: None)
    rng = np.random.default_rng(0)
    config = ServerConfig(max_sessions=max_sessions, threads=threads,
                          limits=Limits(max_sessions_per_client=max_sessions))
    out: dict[str, Any] = {"model": model.source, "preset": cfg.name, "fps_target": fps,
                           "engine_threads": threads or "half the cores",
                           "machine": device_name(model.device), "latency": [], "sessions": []}
    with serve_in_thread(model, config) as url:
        for mode in ("file", "mic"):
            status(f"turn latency ({mode})")
            out["latency"].append(turn_latency(url, face, wave, fps, rate, turns, mode, rng))
        for n in range(1, max_sessions + 1):
            status(f"{n} session(s) at once for {seconds:.0f} s")
            r = sessions_at_once(url, face, wave, fps, rate, n, seconds)
            out["sessions"].append(r)
            if not r["realtime"]:
                break
        out["realtime_sessions"] = max((r["sessions"] for r in out["sessions"] if r["realtime"]), default=0)
        if minutes > 0:
            status(f"one session for {minutes:g} min (memory)")
            out["memory"] = long_session(url, face, wave, rate, minutes, model.device, on_progress)
    return out


def print_serve_bench(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"serve-local: {r['preset']} ({r['model']}) on {r['machine']}, real time = {r['fps_target']} fps")
    t = Table("turn audio sent", "turns", "first frame received (median / p95)", "mouth-to-ear (median / p95)")
    for row in r["latency"]:
        rec, ear = row["received_s"], row["mouth_to_ear_s"]
        t.add_row(row["mode"], str(row["turns"]), f"{rec['median']:.3f} / {rec['p95']:.3f} s",
                  f"{ear['median']:.3f} / {ear['p95']:.3f} s")
    console.print(t)
    t = Table("sessions at once", "fps per session", "player stall per session (s)", "real time")
    for row in r["sessions"]:
        t.add_row(str(row["sessions"]), ", ".join(f"{x:.1f}" for x in row["fps"]),
                  ", ".join(f"{x:.2f}" for x in row["stall_s"]), "yes" if row["realtime"] else
                  ("no: " + "; ".join(row["errors"]) if row["errors"] else "no"))
    console.print(t)
    console.print(f"most sessions in real time: {r['realtime_sessions']}")
    if "memory" in r:
        m = r["memory"]
        console.print(f"memory over a {m['minutes']:g}-min session: {m['start_mb']:.0f} -> {m['end_mb']:.0f} MB "
                      f"({m['growth_mb']:+.1f} MB, {'flat' if m['flat'] else 'NOT flat'} within "
                      f"{m['tolerance_mb']:.0f} MB), {m['frames']} frames")
