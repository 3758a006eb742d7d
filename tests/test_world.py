"""Tests for livetalk_cli.world: determinism, and that every metric separates good from bad videos.

Ground-truth clips are 10 s at 16 fps (160 frames, 96x96); everything runs on CPU in seconds.
Thresholds sit well below the values measured on ground truth (lip-sync ~0.92-0.96 at offset 0,
identity error ~0.015 own vs ~0.5 for another identity) and well above what a wrong video gets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from livetalk_cli.cli import app
from livetalk_cli.media import VideoWriter, load_audio, read_video
from livetalk_cli.world.clip import WorldClip, WorldConfig, audio_envelope, make_clip
from livetalk_cli.world.face import (
    MOUTH_INTERIOR_RGB,
    mouth_colour_distance2,
    prompt_for,
    reference_image,
    sample_attributes,
    sample_identity,
)
from livetalk_cli.world.metrics import (
    drift,
    evaluate_video,
    identity_error,
    lip_sync,
    measure_mouth_open,
    pearson,
    temporal_stability,
    windowed_identity_error,
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
    assert doc["videos"][0]["lip_sync_corr"] > 0.7 and doc["videos"][0]["identity_error"] < 0.05
    assert not list(tmp_path.glob(".*.tmp"))  # the JSON was renamed into place

    lonely = tmp_path / "lonely.mp4"
    videos[0].rename(lonely)
    res = runner.invoke(app, ["eval", str(lonely), "--json", str(tmp_path / "x.json")])
    assert res.exit_code == 2
    assert "reference image not found" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
