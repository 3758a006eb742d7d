"""Tests for livetalk_cli.world: determinism, and that every metric separates good from bad videos.

Ground-truth clips are 10 s at 16 fps (160 frames, 96x96); everything runs on CPU in seconds.
Thresholds sit well below the values measured on ground truth (lip-sync ~0.92-0.96 at offset 0,
identity error ~0.015 own vs ~0.5 for another identity) and well above what a wrong video gets.
"""

from __future__ import annotations

import csv
import json
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from livetalk_cli.bench_table import print_bench
from livetalk_cli.cli import app
from livetalk_cli.media import load_audio
from livetalk_cli.mp4 import VideoWriter, read_video
from livetalk_cli.tables import eval_csv, print_eval
from livetalk_cli.world.clip import WorldClip, WorldConfig, audio_envelope, make_clip
from livetalk_cli.world.evaluate import mean_result
from livetalk_cli.world.face import (
    MOUTH_INTERIOR_RGB,
    mouth_colour_distance2,
    prompt_for,
    reference_image,
    sample_attributes,
    sample_identity,
)
from livetalk_cli.world.metrics import (
    DRIFT_MIN_S,
    drift,
    drift_per_min,
    evaluate_video,
    identity_error,
    lip_sync,
    measure_mouth_open,
    pearson,
    temporal_stability,
    window_spans,
    windowed_identity_error,
    windowed_metrics,
)
from livetalk_cli.world.speech import synth_speech

CFG = WorldConfig()
SR, FPS, SPF = CFG.sample_rate, CFG.fps, CFG.samples_per_frame
N_CLIPS, N_FRAMES = 6, 160
runner = CliRunner()


@pytest.fixture(scope="module")
def clips() -> list[WorldClip]:
    return [make_clip(seed, N_FRAMES, CFG) for seed in range(100, 100 + N_CLIPS)]


def _blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over H and W (edge padding); returns float32."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    h, w = frames.shape[1:3]
    f = np.pad(frames.astype(np.float32), ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    rows = np.zeros((f.shape[0], h, f.shape[2], 3), np.float32)
    for i in range(k.size):
        rows += k[i] * f[:, i: i + h]
    out = np.zeros(frames.shape, np.float32)
    for i in range(k.size):
        out += k[i] * rows[:, :, i: i + w]
    return out


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _degrade(frames: np.ndarray, seed: int) -> np.ndarray:
    """Gaussian blur (sigma 1 px) then Gaussian noise (sigma 8/255)."""
    noise = np.random.default_rng(seed).standard_normal(frames.shape, dtype=np.float32)
    return _to_u8(_blur(frames, 1.0) + 8.0 * noise)


def _write_mp4(path: Path, frames: np.ndarray, audio: np.ndarray) -> Path:
    with VideoWriter(path, frames.shape[2], frames.shape[1], FPS, audio, SR) as w:
        w.write(frames)
    return path


# ------------------------------------------------------------------------------ world generation


def test_same_seed_same_clip_different_seeds_different_identities() -> None:
    a, b = make_clip(7, 24), make_clip(7, 24)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.audio, b.audio)
    np.testing.assert_array_equal(a.reference, b.reference)
    assert a.prompt == b.prompt and a.identity == b.identity
    refs = [make_clip(s, 4).reference.astype(np.float32) for s in range(8)]
    diffs = [np.abs(refs[i] - refs[j]).mean() for i in range(8) for j in range(i + 1, 8)]
    assert min(diffs) > 10.0  # mean |difference| on 0..255 between any two portraits
    same_face = make_clip(8, 4, identity_seed=7)
    np.testing.assert_array_equal(same_face.reference, a.reference)


def test_clip_shapes_and_truth(clips: list[WorldClip]) -> None:
    c = clips[0]
    assert c.frames.shape == (N_FRAMES, CFG.height, CFG.width, 3) and c.frames.dtype == np.uint8
    assert c.audio.shape == (N_FRAMES * SPF,) and c.audio.dtype == np.float32
    assert c.reference.shape == (CFG.height, CFG.width, 3)
    assert c.prompt.startswith("a person talking, ")
    np.testing.assert_array_equal(c.envelope, audio_envelope(c.audio, SR, FPS))
    # The measured mouth follows the truth that drove it.
    assert pearson(measure_mouth_open(c.frames), c.mouth_open) > 0.9


def test_speech_has_pauses_voice_and_range() -> None:
    audio = synth_speech(np.random.default_rng(0), 10 * SR, SR)
    assert audio.dtype == np.float32 and audio.shape == (10 * SR,)
    assert np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0.05
    env = audio_envelope(audio, SR, FPS)
    assert (env == 0).mean() > 0.05  # real silences
    assert (env > 0.7).mean() > 0.2  # and loud syllables
    assert audio_envelope(np.zeros(SR, np.float32), SR, 30).shape == (30,)  # fps need not divide the rate


def test_palettes_stay_clear_of_the_mouth_colour() -> None:
    for seed in range(200):
        idn = sample_identity(np.random.default_rng(seed))
        palette = [idn.skin, idn.hair, idn.eye_color, idn.brow_color, idn.lip_color, idn.background,
                   idn.background2, idn.shirt]
        assert mouth_colour_distance2(np.array(palette)).min() >= 9.0, seed
    assert mouth_colour_distance2(np.array(MOUTH_INTERIOR_RGB)) == 0.0
    ref = reference_image(sample_identity(np.random.default_rng(0)))
    assert measure_mouth_open(ref[None])[0] < 2e-3  # a closed mouth shows (almost) no interior


def test_prompt_vocabulary() -> None:
    prompts = {prompt_for(sample_attributes(np.random.default_rng(s))) for s in range(64)}
    assert "a person talking, neutral expression" in prompts
    assert any("smiling" in p and "nodding" in p for p in prompts)
    assert any("looking to the side" in p for p in prompts)


# ---------------------------------------------------------------------------------------- lip-sync


def test_ground_truth_lip_sync(clips: list[WorldClip]) -> None:
    results = [lip_sync(c.frames, c.audio, SR, FPS) for c in clips]
    assert all(r.offset == 0 for r in results), [r.offset for r in results]
    assert min(r.correlation_at_zero for r in results) >= 0.85
    degraded = [lip_sync(_degrade(c.frames, i), c.audio, SR, FPS) for i, c in enumerate(clips)]
    assert all(r.offset == 0 for r in degraded)
    assert min(r.correlation_at_zero for r in degraded) >= 0.8


def test_lip_sync_after_h264(clips: list[WorldClip], tmp_path: Path) -> None:
    for i, c in enumerate(clips[:2]):
        for name, frames in (("clean", c.frames), ("degraded", _degrade(c.frames, i))):
            path = _write_mp4(tmp_path / f"{name}{i}.mp4", frames, c.audio)
            r = lip_sync(read_video(path), load_audio(path), SR, FPS)
            assert r.offset == 0 and r.correlation_at_zero >= 0.8, (name, i, r.correlation_at_zero)


@pytest.mark.parametrize("k", [-3, 2, 5])
def test_offset_sign_convention(clips: list[WorldClip], k: int) -> None:
    """Audio moved k frames earlier (k < 0: later) means the video lags the audio by k frames."""
    for c in clips[:3]:
        n = abs(k) * SPF
        if k > 0:
            audio = np.concatenate([c.audio[n:], np.zeros(n, np.float32)])
        else:
            audio = np.concatenate([np.zeros(n, np.float32), c.audio[:-n]])
        r = lip_sync(c.frames, audio, SR, FPS)
        assert r.offset == k and r.correlation > 0.8
        assert r.correlations[k] == r.correlation and r.correlation_at_zero < r.correlation - 0.2


def test_mismatched_audio_does_not_correlate(clips: list[WorldClip]) -> None:
    corr = [lip_sync(c.frames, clips[(i + 1) % N_CLIPS].audio, SR, FPS).correlation_at_zero
            for i, c in enumerate(clips)]
    assert np.mean(np.abs(corr)) < 0.25


def test_constant_series_give_zero_not_nan(clips: list[WorldClip]) -> None:
    c = clips[0]
    silent = lip_sync(c.frames, np.zeros_like(c.audio), SR, FPS)
    static = lip_sync(np.repeat(c.frames[:1], N_FRAMES, 0), c.audio, SR, FPS)
    for r in (silent, static):
        assert r.correlation == 0.0 and r.correlation_at_zero == 0.0
        assert not any(np.isnan(v) for v in r.correlations.values())


# ---------------------------------------------------------------------------- identity and stability


def test_identity_error_own_vs_other_reference(clips: list[WorldClip]) -> None:
    own = [identity_error(c.frames, c.reference).mean() for c in clips]
    other = [identity_error(c.frames, clips[(i + 1) % N_CLIPS].reference).mean() for i, c in enumerate(clips)]
    assert max(own) < 0.05
    assert np.mean(other) > 3 * np.mean(own)
    assert all(o > 3 * w for o, w in zip(other, own, strict=True))


def test_identity_error_sees_colour_shift_and_blur(clips: list[WorldClip]) -> None:
    c = clips[0]
    gt = identity_error(c.frames, c.reference).mean()
    shifted = _to_u8(c.frames.astype(np.float32) + np.array([25.0, -15.0, 10.0]))
    blurred = _to_u8(_blur(c.frames, 3.0))
    assert identity_error(shifted, c.reference).mean() > gt + 0.05
    assert identity_error(blurred, c.reference).mean() > gt + 0.03


def test_temporal_stability(clips: list[WorldClip]) -> None:
    black = temporal_stability(np.zeros((20, 32, 32, 3), np.uint8))
    assert black.black_frames == 1.0 and black.frozen_frames == 1.0 and black.flicker == 0.0
    frozen = temporal_stability(np.repeat(clips[0].frames[:1], 20, 0))
    assert frozen.frozen_frames == 1.0 and frozen.flicker == 0.0 and frozen.black_frames == 0.0
    for c in clips:
        gt = temporal_stability(c.frames)
        assert gt.black_frames == 0.0 and 0.05 < gt.flicker < 6.0 and gt.frozen_frames < 0.3
    noisy = temporal_stability(_to_u8(clips[0].frames + np.random.default_rng(0).normal(0, 20, clips[0].frames.shape)))
    assert noisy.flicker > 10.0


def test_drift(clips: list[WorldClip]) -> None:
    c = clips[0]
    ramp = np.linspace(0.0, 1.0, N_FRAMES, dtype=np.float32)[:, None, None, None]
    shifting = _to_u8(c.frames.astype(np.float32) + ramp * np.array([40.0, -20.0, 10.0], np.float32))
    assert drift(identity_error(shifting, c.reference), FPS) > 0.5  # error units per minute
    for g in clips:
        assert abs(drift(identity_error(g.frames, g.reference), FPS)) < 0.1
    windows = windowed_identity_error(np.arange(40, dtype=np.float32), fps=2.0, window_s=10.0)
    assert windows == [9.5, 29.5]


def _shift_over_time(frames: np.ndarray, start: float, end: float) -> np.ndarray:
    """A colour shift growing linearly from `start` to `end` times (40, -20, 10) over the clip."""
    ramp = np.linspace(start, end, frames.shape[0], dtype=np.float32)[:, None, None, None]
    return _to_u8(frames.astype(np.float32) + ramp * np.array([40.0, -20.0, 10.0], np.float32))


def test_drift_is_reported_only_for_long_enough_videos() -> None:
    errors = 0.001 * np.arange(2 * DRIFT_MIN_S, dtype=np.float64)  # 2 fps: +0.002 per second
    assert drift_per_min(errors, fps=2.0) == pytest.approx(0.12)  # exactly DRIFT_MIN_S seconds
    assert drift_per_min(errors[:-1], fps=2.0) is None  # a second short
    assert drift_per_min(errors[:10], fps=2.0, min_seconds=5) == pytest.approx(0.12)

    short = make_clip(7, 5 * FPS)  # the 5-s clip whose drift was extrapolated to a minute
    res = evaluate_video(_shift_over_time(short.frames, 0, 1), short.audio, SR, FPS, short.reference)
    assert res["drift_per_min"] is None and res["drift_window_s"] == 5.0 and res["drift_min_s"] == DRIFT_MIN_S
    json.dumps(res)

    long = make_clip(8, 24 * FPS)
    away = evaluate_video(_shift_over_time(long.frames, 0, 1), long.audio, SR, FPS, long.reference)
    assert away["drift_window_s"] == 24.0 and away["drift_per_min"] > 0.1  # moving away from the reference
    back = drift_per_min(identity_error(_shift_over_time(long.frames, 1, 0), long.reference), FPS)
    assert back is not None and back < -0.1  # starts off, comes back
    still = drift_per_min(identity_error(long.frames, long.reference), FPS)
    assert still is not None and abs(still) < 0.02 < away["drift_per_min"] / 5


def test_mean_over_videos_skips_absent_drift() -> None:
    base = {k: 0.5 for k in ("lip_sync_corr", "lip_sync_offset", "lip_sync_corr_at_zero", "identity_error",
                             "flicker", "black_frames", "frozen_frames", "seconds")}
    results = [{**base, "drift_per_min": d} for d in (None, 0.3, -0.1)]
    mean = mean_result(results)
    assert mean["drift_per_min"] == pytest.approx(0.1) and mean["drift_videos"] == 2
    assert mean["identity_error"] == pytest.approx(0.5)
    none = mean_result(results[:1])
    assert none["drift_per_min"] is None and none["drift_videos"] == 0
    json.dumps(mean)


def test_evaluate_video_is_json_ready(clips: list[WorldClip]) -> None:
    c = clips[1]
    result = evaluate_video(c.frames, c.audio, SR, FPS, c.reference)
    json.dumps(result)
    assert result["lip_sync_offset"] == 0 and result["lip_sync_corr"] > 0.85
    assert result["frames"] == N_FRAMES and result["seconds"] == N_FRAMES / FPS


# --------------------------------------------------------------------------------------------- CLI


def test_eval_command(tmp_path: Path) -> None:
    videos = []
    for seed in (1, 2):
        c = make_clip(seed, 48)
        videos.append(_write_mp4(tmp_path / f"clip{seed}.mp4", c.frames, c.audio))
        Image.fromarray(c.reference).save(tmp_path / f"clip{seed}.ref.png")
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", *map(str, videos), "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert len(doc["videos"]) == 2
    for key in ("lip_sync_corr", "lip_sync_offset", "identity_error", "flicker", "black_frames", "frozen_frames",
                "drift_per_min"):
        assert key in doc["mean"] and all(key in v for v in doc["videos"])
    # 3-s clips: too short for a drift, which is absent (null / "–"), not extrapolated to a minute
    assert [v["drift_per_min"] for v in doc["videos"]] == [None, None] and doc["mean"]["drift_per_min"] is None
    assert [v["drift_window_s"] for v in doc["videos"]] == [3.0, 3.0]
    lines = res.stdout.splitlines()  # not a terminal: plain text
    assert max(map(len, lines)) <= 80 and all(any(v.name in line for line in lines) for v in videos)
    assert "–" in res.stdout and "…" not in res.stdout

    res = runner.invoke(app, ["eval", *map(str, videos), "--csv", "-"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(StringIO(res.stdout)))
    assert [r["video"] for r in rows] == [str(v) for v in videos] and rows[0]["drift_per_min"] == ""
    assert doc["videos"][0]["lip_sync_corr"] > 0.7 and doc["videos"][0]["identity_error"] < 0.05
    assert not list(tmp_path.glob(".*.tmp"))  # the JSON was renamed into place

    lonely = tmp_path / "lonely.mp4"
    videos[0].rename(lonely)
    res = runner.invoke(app, ["eval", str(lonely), "--json", str(tmp_path / "x.json")])
    assert res.exit_code == 2
    assert "reference image not found" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


def test_window_spans() -> None:
    assert window_spans(960, 16, 10) == [(0, 160), (160, 320), (320, 480), (480, 640), (640, 800), (800, 960)]
    assert window_spans(961, 16, 10)[-1] == (800, 960)  # one frame over: not a window of its own
    assert window_spans(400, 16, 10) == [(0, 160), (160, 320), (320, 400)]  # 5 s left: half a window
    assert window_spans(100, 16, 10) == [(0, 100)]
    assert window_spans(30, 16, 10) == [(0, 30)]  # shorter than a window: one window
    with pytest.raises(ValueError):
        window_spans(100, 16, 0)


def test_windowed_lip_sync_stays_valid_over_a_long_true_stream_and_finds_a_local_lag() -> None:
    """30 s of ground truth: every 10-s window in sync at offset 0. Then the video of the middle
    window only is delayed by 2 frames (each frame shows the mouth of 2 frames earlier): that
    window, and only that one, reports offset +2 (positive: the video lags)."""
    clip = make_clip(7, 480, CFG)
    good = windowed_metrics(clip.frames, clip.audio, SR, FPS, clip.reference, 10)
    assert [w["start_s"] for w in good] == [0.0, 10.0, 20.0]
    assert all(w["lip_sync_corr"] > 0.8 and w["lip_sync_offset"] == 0 for w in good), good
    assert all(w["identity_error"] < 0.05 and 0 < w["flicker"] < 10 for w in good)
    lagged = clip.frames.copy()
    lagged[162:320] = clip.frames[160:318]
    got = windowed_metrics(lagged, clip.audio, SR, FPS, clip.reference, 10)
    assert [w["lip_sync_offset"] for w in got] == [0, 2, 0], got


def test_eval_windows(tmp_path: Path) -> None:
    c = make_clip(8, 25 * FPS, CFG)
    video = _write_mp4(tmp_path / "long.mp4", c.frames, c.audio)
    Image.fromarray(c.reference).save(tmp_path / "long.ref.png")
    out = tmp_path / "w.json"
    res = runner.invoke(app, ["eval", str(video), "--windows", "10", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    wins = doc["videos"][0]["windows"]
    assert [(w["start_s"], w["seconds"]) for w in wins] == [(0.0, 10.0), (10.0, 10.0), (20.0, 5.0)]
    assert all(w["lip_sync_corr"] > 0.7 and abs(w["lip_sync_offset"]) <= 1 for w in wins), wins
    assert "per window" in res.stdout and "20-25 s" in res.stdout
    res = runner.invoke(app, ["eval", str(video), str(video), "--windows", "10", "--json", str(out)])
    mean = json.loads(out.read_text())["mean"]["windows"]
    assert [w["videos"] for w in mean] == [2, 2, 2] and mean[0]["lip_sync_corr"] == wins[0]["lip_sync_corr"]
    assert "mean over the videos" in res.stdout and "lowest window lip-sync" in res.stdout
    res = runner.invoke(app, ["eval", str(video), "--windows", "0"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "--windows" in res.output


# ------------------------------------------------------------------------------------------ tables

BOX = set("─━│┃┌┐└┘├┤┬┴┼╭╮╰╯═║…")  # rich's box drawing and its ellipsis


def _consoles() -> list[tuple[str, Console, StringIO]]:
    """An 80-column terminal (styled; its text recorded) and a pipe (not a terminal)."""
    term_buf, pipe_buf = StringIO(), StringIO()
    return [("terminal", Console(width=80, file=term_buf, force_terminal=True, record=True), term_buf),
            ("pipe", Console(width=80, file=pipe_buf), pipe_buf)]


def _printed(console: Console, buf: StringIO) -> str:
    if console.is_terminal:
        assert "\x1b[" in buf.getvalue()  # styled
        return console.export_text(styles=False)
    text = buf.getvalue()
    assert "\x1b" not in text  # plain when piped
    return text


def _result(name: str, seconds: float, drift_value: float | None) -> dict[str, object]:
    return {"video": f"/renders/batch/{name}", "reference": "ref.png", "fps": 16.0, "frames": int(16 * seconds),
            "seconds": seconds, "lip_sync_corr": 0.9123, "lip_sync_offset": -1, "lip_sync_corr_at_zero": 0.88,
            "identity_error": 0.01534, "flicker": 1.234, "black_frames": 0.0, "frozen_frames": 0.125,
            "drift_per_min": drift_value, "drift_window_s": float(int(seconds)), "drift_min_s": float(DRIFT_MIN_S)}


def _laid_out(where: str, console, buf, whole: list[str]) -> tuple[str, list[str]]:
    """What was printed, checked: no line over 80 columns, no box characters, every text of
    `whole` unbroken on one line."""
    text = _printed(console, buf)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80, (where, text)
    assert not BOX & set(text), where
    for needle in whole:
        assert any(needle in line for line in lines), (where, needle, text)
    return text, lines


def test_eval_table_fits_80_columns_whole_names_plain_when_piped() -> None:
    names = ["speech.mp4", "speech_interview_take_07_with_a_long_descriptive_name.mp4", "a.mp4"]
    results = [_result(names[0], 5.0, None), _result(names[1], 42.0, 0.0123), _result(names[2], 30.0, -0.0042)]
    for where, console, buf in _consoles():
        print_eval(results, mean_result(results), console)
        text, lines = _laid_out(where, console, buf, names)
        assert lines[0].split() == ["video", "lip-sync", "offset", "identity", "flicker", "black%", "frozen%",
                                    "drift/min"]
        short = next(line for line in lines if line.startswith("speech.mp4"))
        assert short.split() == ["speech.mp4", "0.912", "-1", "0.0153", "1.23", "0.0", "12.5", "–"]
        long_at = next(i for i, line in enumerate(lines) if line.startswith(names[1]))
        assert lines[long_at + 1].split()[-1] == "+0.0123"  # its numbers on the next line
        mean = next(line for line in lines if line.startswith("mean"))
        assert mean.split()[-1] == "+0.0040"  # over the two videos that have a drift
        assert f"shorter than {DRIFT_MIN_S} s" in text


def test_eval_csv_has_every_video_and_empty_absent_drift() -> None:
    results = [_result("speech.mp4", 5.0, None), _result("long.mp4", 42.0, 0.0123)]
    rows = list(csv.DictReader(StringIO(eval_csv(results))))
    assert [r["video"] for r in rows] == ["/renders/batch/speech.mp4", "/renders/batch/long.mp4"]
    assert rows[0]["drift_per_min"] == "" and float(rows[1]["drift_per_min"]) == 0.0123
    assert float(rows[0]["identity_error"]) == 0.01534 and rows[1]["drift_window_s"] == "42.0"


def test_bench_notes_and_tables_fit_80_columns_and_pipes() -> None:
    span = {"median": 43.0267, "min": 36.1583, "max": 43.8221, "n": 3}
    r = {
        "machine": {"device": "AMD EPYC 9654 96-Core Processor (2 threads)", "torch": "2.13.0+cpu"},
        "model": {"name": "demo", "source": "/work/main/livetalk_cli/assets/demo", "dtype": "float32",
                  "vae_dtype": "float32", "height": 96, "width": 96, "fps": 16, "steps": 4, "block_frames": 3,
                  "sink_frames": 3, "window_frames": 3},
        "options": {},
        "fps": span, "realtime_factor": 2.689, "first_frame_s": {"median": 0.291, "min": 0.262, "max": 0.339},
        "latency_budget": {"audio_before_first_block_s": 0.5625, "lookahead_s": 0.0, "frames_per_block": 12},
        "flops": {"floor_fps": 378.9, "dit_per_frame": 2.3e8, "vae_decode_per_frame": 6.8e7,
                  "dit_attention_per_frame": 6.2e7, "matmul_flop_per_s": 1.13e11, "floor_first_frame_s": 0.0231,
                  "first_frame": 2.61e9},
        "reference": {"fps": 24.82, "first_frame_s": 0.33, "source": "LiveTalk (arXiv 2512.23576), GPU not stated"},
        "stages_s": {"denoise pass 1": {"median": 0.0349, "min": 0.0265, "max": 0.0424},
                     "VAE decode + to host": {"median": 0.1451, "min": 0.121, "max": 0.2956}},
        "compare": [{"options": "pipelined+compile+cuda-graphs+split-threads", "fps": span, "fps_gain": 1.21,
                     "first_frame_s": {"median": 0.308}, "first_frame_gain": 0.92}],
        "peak_memory_mb": 539.2, "peak_memory_kind": "process max RSS",
        "memory_stream": {"minutes": 10.0, "start_mb": 528.1, "end_mb": 531.7, "min_mb": 516.7, "max_mb": 539.1,
                          "growth_mb": 3.6, "tolerance_mb": 16.0, "flat": True},
    }
    whole = ["2.69x real time (16 fps)", "stream start -> first generated frame on host",
             "algorithmic: block 0's frames + 0.000 s look-ahead", "0.298 GFLOP/frame over 0.113 TFLOP/s matmul",
             "27% of the DiT's FLOPs in attention", "2.61 GFLOP to the first frame",
             "first frame 0.33 s; LiveTalk (arXiv 2512.23576), GPU not stated",
             "pipelined+compile+cuda-graphs+split-threads", "growth +3.6 MB (tolerance 16 MB): flat",
             "10.0-minute stream: 528 -> 532 MB, range 517-539 MB", "AMD EPYC 9654 96-Core Processor (2 threads)"]
    for where, console, buf in _consoles():
        print_bench(r, console)
        text, lines = _laid_out(where, console, buf, whole)
        fps_row = next(line for line in lines if line.startswith("steady-state FPS"))
        assert fps_row.split()[-3:] == ["43.03", "36.16", "43.82"]
