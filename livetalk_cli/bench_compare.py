"""`livetalk bench --compare`: every switch combination, then every engine backend, each measured in a
fresh process (`livetalk bench ARGS --speed-only`), with its gain over the first row."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from livetalk_cli.errors import UserError
from livetalk_cli.runtime.stream import StreamOptions


def variants(base: StreamOptions, device: torch.device) -> list[StreamOptions]:
    """Baseline, then each optimisation added in turn, for --compare."""
    out = [StreamOptions(pipelined=False, compile_backend=base.compile_backend, split_threads=base.split_threads,
                         threads=base.threads, attention=base.attention)]
    out.append(dataclasses.replace(out[-1], pipelined=True))
    out.append(dataclasses.replace(out[-1], compile=True))
    if device.type == "cuda":
        out.append(dataclasses.replace(out[-1], cuda_graphs=True))
    return out


def variant_in_subprocess(args: list[str], options: StreamOptions, engine_backend: str | None = None
                          ) -> dict[str, Any]:
    """FPS and first-frame latency of one set of switches, measured by `livetalk bench ARGS --speed-only`
    in a fresh process: threads, compile caches and allocator state of one variant must not leak
    into the next (on CPU a second thread's OpenMP team slowed later sequential runs by ~20 %)."""
    flags = ["--pipelined" if options.pipelined else "--sequential",
             "--compile" if options.compile else "--no-compile",
             "--cuda-graphs" if options.cuda_graphs else "--no-cuda-graphs",
             "--split-threads" if options.split_threads else "--no-split-threads",
             *(["--threads", str(options.threads)] if options.threads else []),
             "--compile-backend", options.compile_backend, "--attention", options.attention,
             *(["--engine-backend", engine_backend] if engine_backend else [])]
    label = (f"{'pipelined' if options.pipelined else 'sequential'} + engine {engine_backend}" if engine_backend
             else options.label())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "variant.json"
        cmd = [sys.executable, "-m", "livetalk_cli", "bench", *args, *flags, "--speed-only", "--json", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"bench variant '{label}' failed: {last}")
        r = json.loads(out.read_text())
    return {"options": label, "fps": r["fps"], "first_frame_s": r["first_frame_s"]}


def compare_rows(options: StreamOptions, device: torch.device,
                 run_variant: Callable[[StreamOptions, str | None], dict[str, Any]], engine_specs: list[str],
                 status: Callable[[str], None]) -> list[dict[str, Any]]:
    """The switches added one by one, then each engine backend (`--engine-backend` values), sequential
    and pipelined on a CPU (which wins depends on the backend); gains against the first row."""
    rows = []
    for v in variants(options, device):
        status(f"comparing: {v.label()} (a fresh process)")
        rows.append(run_variant(v, None))
    schedules = [False, True] if device.type == "cpu" else [options.pipelined]
    for spec in engine_specs:
        for pipelined in schedules:
            v = dataclasses.replace(options, pipelined=pipelined, compile=False, cuda_graphs=False)
            status(f"comparing: {v.label()} + engine {spec} (a fresh process)")
            rows.append(run_variant(v, spec))
    base = rows[0]
    for r in rows:
        r["fps_gain"] = r["fps"]["median"] / base["fps"]["median"]
        r["first_frame_gain"] = base["first_frame_s"]["median"] / r["first_frame_s"]["median"]
    return rows
