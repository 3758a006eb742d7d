"""The distillation report's long streams: lip-sync, offset, identity error and flicker per window
over minute-long streams, and the identity sinks compared on the same footing.

* Held-out identities with their own speech: world clips of `seconds` (seeds `heldout_seed +
  600_000 + i`, frame 0 = the reference). Each row is scored per consecutive `window_s` window
  (`metrics.windowed_metrics`: each window's lip-sync on its own frames and audio).
* Rows: the ground truth (the metric's ceiling over a long stream), the VAE alone (the true frames
  chunk-encoded and stream-decoded as render decodes: what no DiT can beat) and each student
  streamed the way `livetalk render` streams it (`report.stream_frames`).
* Per window, over identities: the mean lip-sync correlation with its 95 % interval, the share of
  identities whose best offset is within +-1 frame, the mean identity error and flicker; per row
  the identity drift per minute (`metrics.drift_per_min`, mean over identities).
* Sinks: the final student with its sinks and with the same cache size without sinks, on longer
  streams of other identities (seeds `+ 900_000 + i`); the paired gain is the per-identity
  (no sinks - sinks) difference of a metric, same audio and noise seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from livetalk_cli.distill.context import StageContext
from livetalk_cli.distill.data import world_clip
from livetalk_cli.distill.vae_stage import stream_roundtrip_frames
from livetalk_cli.pipeline import LoadedModel
from livetalk_cli.world.metrics import evaluate_video

WINDOW_METRICS = ("lip_sync_corr", "identity_error", "flicker")
LONG_SEED, SINK_SEED = 600_000, 900_000


def ci95(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    half = 1.96 * a.std(ddof=1) / np.sqrt(a.size) if a.size > 1 else float("nan")
    return {"mean": float(a.mean()), "ci95": float(half), "n": int(a.size)}


def _clips(ctx: StageContext, cfg: Any, seed: int, num_frames: int, identities: int) -> Iterator[Any]:
    for i in range(identities):
        yield world_clip(cfg, ctx.recipe.world.heldout_seed + seed + i, num_frames)


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """`evaluate_video` results with windows, one per identity → per window: every metric's mean
    with its interval and the share of identities within +-1 frame of offset 0; the identity
    drift per minute; each identity's mean identity error and lip-sync (for paired comparisons)."""
    n_win = min(len(r["windows"]) for r in results)
    windows = []
    for i in range(n_win):
        ws = [r["windows"][i] for r in results]
        row: dict[str, Any] = {"start_s": ws[0]["start_s"], "seconds": ws[0]["seconds"]}
        row.update({m: ci95([w[m] for w in ws]) for m in WINDOW_METRICS})
        row["offsets"] = [int(w["lip_sync_offset"]) for w in ws]
        row["offset_within_1"] = float(np.mean([abs(o) <= 1 for o in row["offsets"]]))
        windows.append(row)
    drifts = [r["drift_per_min"] for r in results if r["drift_per_min"] is not None]
    return {
        "identities": len(results), "windows": windows,
        "drift_per_min": ci95(drifts) if drifts else None,
        "identity_error": ci95([r["identity_error"] for r in results]),
        "per_identity": {"identity_error": [r["identity_error"] for r in results],
                         "lip_sync_corr": [float(np.mean([w["lip_sync_corr"] for w in r["windows"]]))
                                           for r in results]},
    }


def score(videos: Iterator[tuple[np.ndarray, Any]], cfg: Any, window_s: float) -> dict[str, Any]:
    return summarise([evaluate_video(frames, clip.audio, cfg.audio.sample_rate, cfg.fps, clip.reference, window_s)
                      for frames, clip in videos])


def long_stream_study(models: dict[str, LoadedModel], ctx: StageContext, stream: Callable[..., np.ndarray], *,
                      seconds: float, identities: int, window_s: float = 10.0) -> dict[str, Any]:
    """Ground truth, the VAE alone and each model over `seconds`-long streams of `identities`
    held-out identities. `stream(model, reference, prompt, audio, num_frames, seed)` → frames."""
    base = next(iter(models.values()))
    cfg, sc = base.cfg, base.cfg.stream
    n = 1 + int(seconds * cfg.fps) // cfg.vae.temporal_factor * cfg.vae.temporal_factor  # whole latents
    clips = list(_clips(ctx, cfg, LONG_SEED, n, identities))
    rows: dict[str, Any] = {
        "ground_truth": score(((c.frames, c) for c in clips), cfg, window_s),
        "vae_roundtrip": score(((stream_roundtrip_frames(base.vae, c.frames, ctx.recipe.world.clip_frames, sc), c)
                               for c in clips), cfg, window_s),
    }
    for name, model in models.items():
        rows[name] = score(((stream(model, c.reference, c.prompt, c.audio, n, i), c) for i, c in enumerate(clips)),
                           cfg, window_s)
        ctx.progress("report: long streams", len(rows) - 2, len(models))
    return {"seconds": n / cfg.fps, "window_s": window_s, "rows": rows}


def sink_study(model: LoadedModel, ctx: StageContext, stream: Callable[..., np.ndarray], *, seconds: float,
               identities: int, window_s: float = 60.0) -> dict[str, Any]:
    """The model with its sinks vs the same cache size without sinks, over `seconds`-long streams;
    paired gains (no sinks - sinks) of identity error (positive: sinks help) and of lip-sync
    (negative: sinks help)."""
    cfg = model.cfg
    n = int(seconds * cfg.fps)
    variants = {
        "with_sinks": cfg.stream,
        "no_sinks": dataclasses.replace(cfg.stream, sink_frames=0,
                                        window_frames=cfg.stream.sink_frames + cfg.stream.window_frames),
    }
    out: dict[str, Any] = {}
    for name, stream_cfg in variants.items():
        m = dataclasses.replace(model, cfg=cfg.replace(stream=stream_cfg))
        out[name] = score(((stream(m, c.reference, c.prompt, c.audio, n, i), c)
                           for i, c in enumerate(_clips(ctx, cfg, SINK_SEED, n, identities))), cfg, window_s)
        out[name].update(sink_frames=stream_cfg.sink_frames, window_frames=stream_cfg.window_frames)
    gain = {k: ci95((np.asarray(out["no_sinks"]["per_identity"][k])
                     - np.asarray(out["with_sinks"]["per_identity"][k])).tolist())
            for k in ("identity_error", "lip_sync_corr")}
    return {"seconds": seconds, "window_s": window_s, "variants": out, "paired_gain": gain}


def markdown(long: dict[str, Any] | None, sinks: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    if long:
        first = next(iter(long["rows"].values()))
        ids = first["identities"]
        heads = [f"{w['start_s']:.3g}-{w['start_s'] + w['seconds']:.3g} s" for w in first["windows"]]
        lines += ["", f"### Long streams: {long['seconds']:g} s, {ids} held-out identities with their own speech, "
                      f"per {long['window_s']:g}-s window", ""]
        for metric, label in (("lip_sync_corr", "lip-sync corr (mean ± 95 %)"),
                              ("offset_within_1", "share of identities with best offset within ±1"),
                              ("identity_error", "identity error"), ("flicker", "flicker")):
            drift_col = metric == "identity_error"
            lines += [f"| {label} | " + " | ".join(heads) + (" | drift / min |" if drift_col else " |"),
                      "|---|" + "---|" * (len(heads) + drift_col)]
            for name, row in long["rows"].items():
                cells = [_cell(w[metric]) for w in row["windows"]]
                if drift_col:
                    d = row["drift_per_min"]
                    cells.append("—" if d is None else f"{d['mean']:+.4f} ± {d['ci95']:.4f}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    if sinks:
        v = sinks["variants"]
        lines += ["", f"### Identity sinks over {sinks['seconds'] / 60:g}-min streams "
                      f"({v['with_sinks']['identities']} held-out identities, per {sinks['window_s']:g}-s window)", "",
                  "| variant | identity error | drift / min | lip-sync per window | identity error per window |",
                  "|---|---|---|---|---|"]
        for name, d in v.items():
            drift = "—" if d["drift_per_min"] is None else f"{d['drift_per_min']['mean']:+.4f}"
            lines.append(f"| {name} (sinks {d['sink_frames']}, window {d['window_frames']}) | "
                         f"{_cell(d['identity_error'])} | {drift} | "
                         + ", ".join(f"{w['lip_sync_corr']['mean']:.2f}" for w in d["windows"]) + " | "
                         + ", ".join(f"{w['identity_error']['mean']:.3f}" for w in d["windows"]) + " |")
        g = sinks["paired_gain"]
        lines += ["", "Paired gains of the sinks (no sinks minus sinks, per identity, same audio and seeds; "
                      f"n = {g['identity_error']['n']}): identity error {_cell(g['identity_error'], 4, True)} "
                      f"(positive: sinks help), lip-sync {_cell(g['lip_sync_corr'], 3, True)} (negative: sinks help)."]
    return lines


def _cell(v: Any, digits: int = 3, signed: bool = False) -> str:
    if isinstance(v, dict):
        mean = f"{v['mean']:+.{digits}f}" if signed else f"{v['mean']:.{digits}f}"
        return f"{mean} ± {v['ci95']:.{digits}f}"
    return f"{100 * v:.0f} %"
