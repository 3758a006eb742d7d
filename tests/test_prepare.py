"""`livetalk prepare`: world clips written as real video files (MP4 at 30 fps with 44.1 kHz stereo
AAC, MKV at 25 fps with 48 kHz stereo FLAC; lossless pictures) become shards equal to the direct
encoding of the frames and audio the test reads back itself; bad files are skipped and listed;
reruns resume; distill's loader reads the result."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from livetalk_cli.cli import app
from livetalk_cli.distill.data import clip_audio_features, load_latents, video_tensor
from livetalk_cli.media import load_audio
from livetalk_cli.pipeline import load_encoders
from livetalk_cli.prepare_media import pick_reference
from livetalk_cli.world.clip import WorldConfig, make_clip

CLIP = 17  # tiny preset: 1 + 4k frames
runner = CliRunner()


def _write_video(path: Path, seed: int, seconds: float, fps: int, rate: int, vcodec: str, pix: str, acodec: str,
                 opts: dict[str, str] | None = None) -> None:
    clip = make_clip(seed, int(seconds * fps), WorldConfig(height=72, width=96, fps=fps, sample_rate=rate))
    with av.open(str(path), "w") as c:
        vs = c.add_stream(vcodec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = 96, 72, pix
        vs.options = opts or {}
        a = c.add_stream(acodec, rate=rate)
        a.layout = "stereo"
        for img in clip.frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                c.mux(p)
        st = np.stack([clip.audio, clip.audio * 0.5]).astype(np.float32)  # stereo: the channels differ
        frame = av.AudioFrame.from_ndarray(st, format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, 0
        for p in a.encode(frame):
            c.mux(p)
        for stream in (a, vs):
            for p in stream.encode(None):
                c.mux(p)


def _expected_frames(path: Path, fps: int, n: int) -> np.ndarray:
    """Output frame j = the last decoded frame stamped at or before j/fps, center-cropped 96x72 → 64x64
    (a 72x72 crop, then scaled: written out here, not through the code under test)."""
    from PIL import Image

    with av.open(str(path)) as c:
        decoded = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    out = []
    for j in range(n):
        img = [im for t, im in decoded if t <= j / fps + 1e-6][-1]
        pil = Image.fromarray(img).resize((85, 64), Image.Resampling.LANCZOS)  # cover 64x64: scale 64/72
        left = (85 - 64) // 2
        out.append(np.asarray(pil.crop((left, 0, left + 64, 64))))
    return np.stack(out)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    _write_video(d / "a.mp4", 1, 3.3, 30, 44100, "libx264rgb", "rgb24", "aac", {"crf": "0"})  # 3 clips
    _write_video(d / "b.mkv", 2, 2.3, 25, 48000, "ffv1", "bgr0", "flac")  # 2 clips
    (d / "b.txt").write_text("a person  nodding\n")
    _write_video(d / "short.mkv", 3, 0.5, 25, 48000, "ffv1", "bgr0", "flac")
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return d


def _prepare(videos: Path, out: Path, *extra: str) -> tuple[int, str]:
    """(exit code, the output on one line: rich wraps at the terminal's width)"""
    r = runner.invoke(app, ["prepare", str(videos), "--out", str(out), "--random-weights", "--preset", "tiny",
                            "--clip-frames", str(CLIP), "--device", "cpu", *extra])
    return r.exit_code, " ".join(r.output.split())


def test_prepare_equals_direct_encoding_skips_bad_files_and_resumes(videos, tmp_path):
    out = tmp_path / "data"
    code, text = _prepare(videos, out)
    assert code == 1, text  # one unreadable file
    assert "broken.mp4" in text and "unreadable" in text
    assert "short.mkv" in text and "too short" in text
    assert "5 clips in 1 shards (5 encoded now)" in text

    cfg, vae, encoder, _ = load_encoders(checkpoint=None, preset_name="tiny", random_weights=True,
                                         device=torch.device("cpu"), seed=0)
    shard = out / "shard_00000.safetensors"
    t = load_file(str(shard))
    with safe_open(str(shard), "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
    assert prompts == ["a person talking"] * 3 + ["a person nodding"] * 2
    assert t["latents"].shape[0] == 5 and t["index"].tolist() == list(range(5))
    row = 0
    for name, clips in (("a.mp4", 3), ("b.mkv", 2)):  # 30 and 25 fps sources
        frames = _expected_frames(videos / name, 16, clips * CLIP)
        audio = load_audio(videos / name, 16000)
        for k in range(clips):
            clip = frames[k * CLIP: (k + 1) * CLIP].copy()
            ref = int(t["reference_frame"][row])
            assert 0 <= ref < CLIP
            clip[0] = clip[ref]
            lat = vae.encode(video_tensor(clip)[None]).half()
            torch.testing.assert_close(t["latents"][row: row + 1], lat, rtol=0, atol=2e-3)
            feats = clip_audio_features(encoder, cfg, audio[k * CLIP * 1000: (k + 1) * CLIP * 1000], CLIP).half()
            torch.testing.assert_close(t["audio"][row], feats, rtol=0, atol=2e-3)
            still = vae.encode_reference(video_tensor(clip[:1])[None], cfg.still_reference_latents).half()
            torch.testing.assert_close(t["reference"][row: row + 1], still, rtol=0, atol=2e-3)
            row += 1

    data = load_latents(out, 5)  # what distill reads (world.latents)
    assert len(data) == 5 and data.reference is not None and data.mouth is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["clips"] == 5 and "error" in manifest["videos"][str(videos / "broken.mp4")]

    before = shard.stat().st_mtime_ns
    assert "(0 encoded now)" in _prepare(videos, out)[1] and shard.stat().st_mtime_ns == before  # kept as it was

    shard.unlink()  # as if the run had stopped before writing it
    assert "(5 encoded now)" in _prepare(videos, out)[1]
    torch.testing.assert_close(load_file(str(shard))["latents"], t["latents"], rtol=0, atol=0)


def test_prepare_splits_into_shards_and_encodes_only_what_changed(videos, tmp_path, monkeypatch):
    import livetalk_cli.prepare as prep

    monkeypatch.setattr(prep, "SHARD", 2)
    out = tmp_path / "data"
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.mp4", "b.mkv"):
        (src / name).write_bytes((videos / name).read_bytes())
    code, text = _prepare(src, out, "--workers", "2")
    assert code == 0, text
    assert "5 clips in 3 shards (5 encoded now)" in text
    assert sorted(p.name for p in out.glob("shard_*")) == [f"shard_0000{k}.safetensors" for k in range(3)]
    first = load_file(str(out / "shard_00000.safetensors"))["latents"]
    (src / "b.txt").write_text("a person laughing")  # b's clips are 3 and 4: shards 1 and 2 change
    assert "(3 encoded now)" in _prepare(src, out)[1]
    torch.testing.assert_close(load_file(str(out / "shard_00000.safetensors"))["latents"], first, rtol=0, atol=0)


def test_reference_is_the_sharpest_well_exposed_frame():
    rng = np.random.default_rng(0)
    texture = rng.integers(60, 200, (32, 32, 3)).astype(np.uint8)
    blurred = np.full_like(texture, 128)
    blurred[::2] = 130
    frames = np.stack([
        blurred,                                   # well exposed, nearly flat
        np.clip(texture.astype(int) + 120, 0, 255).astype(np.uint8),  # sharp but blown out
        texture,                                   # sharp and well exposed
        (texture // 8).astype(np.uint8),           # sharp but far too dark
    ])
    assert pick_reference(frames) == 2
    dark = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (5, 40, 250)])  # nothing usable
    assert pick_reference(dark) == 1  # the mean nearest mid-grey


def test_prepare_refuses_bad_input_before_loading_anything(tmp_path):
    r = runner.invoke(app, ["prepare", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--random-weights"])
    assert r.exit_code == 2 and "not found" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["prepare", str(empty), "--out", str(tmp_path / "o"), "--random-weights"])
    assert r.exit_code == 2 and "no videos" in r.output
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"video": "x.mp4", "box": [1, 2]}\n')
    r = runner.invoke(app, ["prepare", "--manifest", str(bad), "--out", str(tmp_path / "o"), "--random-weights"])
    assert r.exit_code == 2 and "m.jsonl:1" in r.output
    assert not (tmp_path / "o").exists()


def test_distill_runs_on_prepared_shards_with_a_teacher_checkpoint(videos, tmp_path):
    """The real-data path of recipes/omniavatar-1.3b at tiny size: prepare → trajectories → ODE init →
    DMD from a teacher checkpoint folder (whose VAE the student folder gets) → a student that loads."""
    import yaml

    from livetalk_cli.checkpoint import save_checkpoint
    from livetalk_cli.pipeline import load_model

    code, text = _prepare(videos / "a.mp4", tmp_path / "data", "--clip-frames", "21")
    assert code == 0 and "2 clips in 1 shards" in text, text
    teacher = load_model(random_weights=True, preset_name="tiny", device=torch.device("cpu"), dtype=torch.float32)
    save_checkpoint(tmp_path / "teacher", teacher.cfg, {"dit": teacher.dit, "vae": teacher.vae,
                                                        "text_encoder": teacher.text_encoder})
    recipe = {
        "name": "real-tiny", "model": "tiny", "seed": 0, "device": "cpu", "stages": ["trajectories", "ode_init", "dmd"],
        "world": {"train_clips": 2, "clip_frames": 21, "latents": str(tmp_path / "data")},
        "teacher": {"checkpoint": str(tmp_path / "teacher")},
        "trajectories": {"num_samples": 2, "num_steps": 4, "keep_steps": [0, 1, 2, 3, 4], "shard_size": 2,
                         "batch_size": 2},
        "ode_init": {"steps": 2, "batch_size": 2, "log_every": 1, "plateau_window": 1},
        "dmd": {"steps": 2, "batch_size": 2, "num_blocks": 2, "critic_warmup": 1, "critic_per_gen": 2,
                "ema_start": 1, "log_every": 1},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = runner.invoke(app, ["distill", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    student = load_model(checkpoint=tmp_path / "run" / "student", device=torch.device("cpu"), dtype=torch.float32)
    for name, weight in teacher.vae.state_dict().items():  # the teacher's VAE, not a missing stage's
        torch.testing.assert_close(student.vae.state_dict()[name], weight, rtol=0, atol=0)
