"""`livetalk render` end to end on the tiny preset with random weights (CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from livetalk_cli.checkpoint import save_checkpoint
from livetalk_cli.cli import app
from livetalk_cli.mp4 import probe, read_video
from livetalk_cli.pipeline import load_model

ROOT = Path(__file__).resolve().parent.parent
FACE = ROOT / "examples" / "face.png"
runner = CliRunner()


def write_wav(path: Path, seconds: float, sr: int = 16000, seed: int = 0) -> Path:
    n = round(seconds * sr)
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    x = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(n)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


def render(*args: str):
    return runner.invoke(app, ["render", *args, "--random-weights", "--device", "cpu"])


@pytest.mark.parametrize("seconds", [0.37, 1.0, 2.71])
def test_render_streams_frames_and_durations(tmp_path, seconds):
    audio = write_wav(tmp_path / "a.wav", seconds)
    out = tmp_path / "out" / "a.mp4"
    res = render(str(audio), "--image", str(FACE), "--out", str(out))
    assert res.exit_code == 0, res.output
    info = probe(out)
    frames = math.ceil(seconds * 16)
    assert info["video"]["codec"] == "h264" and info["video"]["pix_fmt"] == "yuv420p"
    assert info["audio"]["codec"] == "aac"
    assert info["video"]["frames"] == frames
    assert (info["video"]["width"], info["video"]["height"]) == (64, 64)
    assert abs(info["video"]["duration"] - frames / 16) < 1e-6
    assert abs(info["audio"]["duration"] - seconds) < 1 / 16
    assert abs(info["video"]["duration"] - info["audio"]["duration"]) < 1 / 16
    assert info["faststart"]
    assert [p.name for p in out.parent.iterdir()] == ["a.mp4"]  # no temp files left


def test_checkpoint_round_trip_renders_identical_frames(tmp_path):
    audio = write_wav(tmp_path / "a.wav", 1.2)
    model = load_model(random_weights=True, preset_name="tiny", device="cpu", seed=0)
    ck = tmp_path / "ck"
    save_checkpoint(ck, model.cfg, {"dit": model.dit, "vae": model.vae, "text_encoder": model.text_encoder})
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    assert render(str(audio), "--image", str(FACE), "--out", str(a)).exit_code == 0
    res = runner.invoke(app, ["render", str(audio), "--image", str(FACE), "--out", str(b), "--checkpoint", str(ck)])
    assert res.exit_code == 0, res.output
    va, vb = read_video(a), read_video(b)
    assert va.shape == vb.shape and np.array_equal(va, vb)
    assert va.std() > 1.0  # not a blank video
    # the DiT reaches the frames: the same checkpoint with its output head zeroed renders otherwise
    with torch.no_grad():
        model.dit.head.head.weight.zero_()
    save_checkpoint(tmp_path / "zero", model.cfg, {"dit": model.dit, "vae": model.vae,
                                                   "text_encoder": model.text_encoder})
    z = tmp_path / "z.mp4"
    res = runner.invoke(app, ["render", str(audio), "--image", str(FACE), "--out", str(z), "--checkpoint",
                              str(tmp_path / "zero")])
    assert res.exit_code == 0, res.output
    assert np.abs(read_video(z).astype(int) - va).mean() > 1.0
    # a different seed gives different frames
    c = tmp_path / "c.mp4"
    assert render(str(audio), "--image", str(FACE), "--out", str(c), "--seed", "7").exit_code == 0
    assert not np.array_equal(read_video(c), va)


def test_batch_manifest_resumes_and_isolates_failures(tmp_path, monkeypatch):
    for name, sec in (("x", 0.6), ("y", 0.9), ("z", 0.5)):
        write_wav(tmp_path / f"{name}.wav", sec)
    lines = [
        {"audio": "x.wav", "image": str(FACE), "out": "out/x.mp4"},
        {"audio": "missing.wav", "out": "out/m.mp4", "prompt": "smiling"},
        {"audio": "y.wav", "out": "out/y.mp4"},
    ]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    # bad input anywhere: one line per bad job, exit 2, nothing rendered (checked before the model loads)
    res = render("--manifest", str(manifest), "--image", str(FACE))
    assert res.exit_code == 2, res.output
    assert f"{manifest}:2: audio file not found: {tmp_path / 'missing.wav'}" in res.output
    assert "1 of 3 jobs have bad input" in res.output and not (tmp_path / "out").exists()
    write_wav(tmp_path / "missing.wav", 0.5)
    assert render("--manifest", str(manifest), "--image", str(FACE)).exit_code == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["m.mp4", "x.mp4", "y.mp4"]
    assert probe(out / "m.mp4")["video"]["frames"] == 8
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = render("--manifest", str(manifest), "--image", str(FACE))  # resume: all done
    assert res.exit_code == 0, res.output
    assert res.output.count("skipped (exists, same input)") == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # a job whose input changed is not silently skipped
    write_wav(tmp_path / "y.wav", 0.9, seed=1)
    res = render("--manifest", str(manifest), "--image", str(FACE))
    assert res.exit_code == 2 and "out/y.mp4 exists but was made from a different audio: use --overwrite" in res.output
    res = render("--manifest", str(manifest), "--image", str(FACE), "--seed", "3")
    assert res.exit_code == 2 and "different audio, model, seed" in res.output  # random weights: seeded
    # a job crashing while it renders is reported; the others go on
    import livetalk_cli.render as render_mod

    real = render_mod.render_job

    def crash_on_x(model, job, **kwargs):
        if job.audio.name == "x.wav":
            raise RuntimeError("kaboom")
        return real(model, job, **kwargs)

    monkeypatch.setattr(render_mod, "render_job", crash_on_x)
    res = render("--manifest", str(manifest), "--image", str(FACE), "--overwrite")
    assert res.exit_code == 1 and "1 of 3 job(s) failed" in res.output and "kaboom" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["m.mp4", "x.mp4", "y.mp4"]  # x: the old file stays


def test_manifest_paths_and_the_image_default(tmp_path, monkeypatch):
    """Paths inside a manifest are relative to it; --image on the command line is relative to
    the working directory (as every command-line path)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "face.png").write_bytes(FACE.read_bytes())
    (tmp_path / "sub").mkdir()
    write_wav(tmp_path / "sub" / "a.wav", 0.4)
    (tmp_path / "sub" / "rel.jsonl").write_text(json.dumps({"audio": "a.wav", "out": "o/a.mp4"}) + "\n")
    res = render("--manifest", "sub/rel.jsonl", "--image", "faces/face.png")
    assert res.exit_code == 0, res.output
    assert probe(tmp_path / "sub" / "o" / "a.mp4")["video"]["frames"] == 7


def _assert_clean_failure(res, out: Path, code: int, needle: str):
    assert res.exit_code == code, res.output
    assert needle in res.output
    assert "Traceback" not in res.output
    assert not out.exists()
    if out.parent.exists():
        assert list(out.parent.iterdir()) == []


def test_bad_inputs_fail_cleanly(tmp_path, monkeypatch):
    """Bad input: exit 2, one line naming the file once, found before the model loads."""
    import livetalk_cli.pipeline as pipeline

    def no_load(**kwargs):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(pipeline, "load_model", no_load)
    out = tmp_path / "o" / "v.mp4"
    good = write_wav(tmp_path / "g.wav", 0.5)
    res = render(str(tmp_path / "nope.wav"), "--image", str(FACE), "--out", str(out))
    _assert_clean_failure(res, out, 2, "not found")
    assert res.output.count("nope.wav") == 1
    corrupt = tmp_path / "c.wav"
    corrupt.write_text("this is not audio")
    _assert_clean_failure(render(str(corrupt), "--image", str(FACE), "--out", str(out)), out, 2, "c.wav")
    empty = write_wav(tmp_path / "e.wav", 0.0)
    _assert_clean_failure(render(str(empty), "--image", str(FACE), "--out", str(out)), out, 2, "e.wav")
    bad_img = tmp_path / "face.png"
    bad_img.write_bytes(b"\x89PNG garbage")
    _assert_clean_failure(render(str(good), "--image", str(bad_img), "--out", str(out)), out, 2, "face.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "g.wav", "out": "o/v.mp4"}\n{"audio": "g.wav"\n')
    _assert_clean_failure(render("--manifest", str(manifest), "--image", str(FACE)), out, 2, "m.jsonl:2")
    manifest.write_text('{"audio": "g.wav", "out": "o/v.mp4"}\n{"audio": "g.wav", "out": "o/../o/v.mp4"}\n')
    _assert_clean_failure(render("--manifest", str(manifest), "--image", str(FACE)), out, 2, "both write")
    _assert_clean_failure(render(str(good), "--out", str(out)), out, 2, "--image is required")
    _assert_clean_failure(render(str(good), "--image", str(FACE), "--out", str(out), "--cuda-graphs"), out, 2,
                          "needs a CUDA device")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    res = render(str(good), "--image", str(FACE), "--out", str(blocker / "v.mp4"))
    assert res.exit_code == 2 and f"{blocker} is not a folder" in res.output
    res = render(str(good), "--image", str(FACE), "--out", "/proc/livetalk-test.mp4")  # read-only for root too
    assert res.exit_code == 2 and "is not writable" in res.output, res.output
    res = runner.invoke(app, ["render", str(good), "--image", str(FACE), "--out", str(out), "--preset", "bogus"])
    assert res.exit_code == 2 and "'bogus' is not one of" in res.output and "Value error" not in res.output


def test_stale_temporaries_are_removed_and_ctrl_c_leaves_nothing(tmp_path, monkeypatch):
    audio = write_wav(tmp_path / "a.wav", 0.4)
    out = tmp_path / "o" / "a.mp4"
    out.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [out.with_name(f".a.mp4.{int(dead.stdout)}-0123abcd.tmp"), out.with_name(".a.mp4.89abcdef.tmp")]
    alive = out.with_name(f".a.mp4.{os.getpid()}-fedcba98.tmp")  # another render still writing it
    other = out.with_name(".a.mp4.x.1-0123abcd.tmp")  # a temporary of the output "a.mp4.x"
    for t in (*stale, alive, other):
        t.write_bytes(b"partial")
    assert render(str(audio), "--image", str(FACE), "--out", str(out)).exit_code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["a.mp4", alive.name, other.name])
    import livetalk_cli.render as render_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(render_mod, "load_audio", interrupted)  # Ctrl-C while the job runs
    out2 = tmp_path / "o" / "b.mp4"
    res = render(str(audio), "--image", str(FACE), "--out", str(out2))
    assert res.exit_code == 130 and "interrupted: no partial output was written" in res.output
    assert not out2.exists() and not list(out.parent.glob(".b.mp4*"))


def test_same_switches_and_thread_counts_render_the_same_video(tmp_path):
    """Repeated renders are bit-identical; pipelined with a budget of 2 threads (1 per stage) and
    sequential with 1 run every op at the same thread count, so they are identical too."""
    audio = write_wav(tmp_path / "a.wav", 1.3)
    runs = {"base": ["--threads", "2"], "again": ["--threads", "2"], "sequential": ["--sequential", "--threads", "1"]}
    for name, extra in runs.items():
        res = render(str(audio), "--image", str(FACE), "--out", str(tmp_path / f"{name}.mp4"), *extra)
        assert res.exit_code == 0, res.output
    a = read_video(tmp_path / "base.mp4")
    assert a.std() > 1.0
    for name in ("again", "sequential"):
        np.testing.assert_array_equal(read_video(tmp_path / f"{name}.mp4"), a)  # deterministic H.264 out


def test_checkpoint_mismatch_and_nan_weights(tmp_path):
    audio = write_wav(tmp_path / "a.wav", 0.5)
    model = load_model(random_weights=True, preset_name="tiny", device="cpu")
    ck = tmp_path / "ck"
    save_checkpoint(ck, model.cfg, {"dit": model.dit, "vae": model.vae, "text_encoder": model.text_encoder})
    out = tmp_path / "o" / "v.mp4"
    res = runner.invoke(app, ["render", str(audio), "--image", str(FACE), "--out", str(out), "--checkpoint",
                              str(ck), "--preset", "omniavatar-1.3b"])
    _assert_clean_failure(res, out, 2, "is a 'tiny' model")
    # a checkpoint whose config says another architecture than its weights
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"]["dit"]["num_layers"] = 6
    (ck / "config.json").write_text(json.dumps(cfg))
    res = runner.invoke(app, ["render", str(audio), "--image", str(FACE), "--out", str(out), "--checkpoint", str(ck)])
    _assert_clean_failure(res, out, 2, "56 missing key(s): audio_cond_projs.1.bias")
    assert "blocks.4.cross_attn.k.bias" in res.output
    # NaN weights: caught where frames are emitted, nothing written
    with torch.no_grad():
        model.dit.head.head.weight.fill_(float("nan"))
    save_checkpoint(ck, model.cfg, {"dit": model.dit, "vae": model.vae, "text_encoder": model.text_encoder})
    res = runner.invoke(app, ["render", str(audio), "--image", str(FACE), "--out", str(out), "--checkpoint", str(ck)])
    _assert_clean_failure(res, out, 1, "NaN")


def _peak_rss_mb(tmp_path: Path, seconds: float) -> float:
    audio = write_wav(tmp_path / f"{seconds}.wav", seconds)
    code = (
        "import resource, sys\n"
        "from livetalk_cli.cli import app\n"
        f"try: app(['render', {str(audio)!r}, '--image', {str(FACE)!r}, '--out', {str(tmp_path / 'm.mp4')!r},"
        " '--random-weights', '--device', 'cpu', '--overwrite'])\n"
        "except SystemExit as e: assert not e.code, e.code\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_memory_does_not_grow_with_audio_length(tmp_path):
    short = _peak_rss_mb(tmp_path, 10.0)
    long = _peak_rss_mb(tmp_path, 60.0)
    # Measured here: 506 MB (10 s), 525 MB (60 s), 504 MB (120 s): flat within allocator noise.
    # Keeping 60 s of decoded float frames would add ~47 MB; the waveform itself is ~4 MB.
    assert long <= short + 40, (short, long)


def test_a_crashing_job_is_one_line_and_its_traceback_shows_with_verbose(tmp_path, monkeypatch):
    import livetalk_cli.render as render_mod

    def crash(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(render_mod, "render_job", crash)
    audio = write_wav(tmp_path / "a.wav", 0.3)
    args = ["render", str(audio), "--image", str(FACE), "--out", str(tmp_path / "a.mp4"), "--random-weights",
            "--device", "cpu"]
    quiet = runner.invoke(app, args)
    assert quiet.exit_code == 1 and "RuntimeError: kaboom" in quiet.output and "Traceback" not in quiet.output
    loud = runner.invoke(app, ["-v", *args])
    assert loud.exit_code == 1 and "Traceback" in loud.output and "kaboom" in loud.output
