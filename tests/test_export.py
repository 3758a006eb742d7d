"""`livetalk export` and `--engine`: ONNX Runtime engines equal eager PyTorch, whole streams too, and
engines built for anything else are refused (CPU; the AOTInductor twins are in the slow run).

The references are the eager model's own calls (`dit_pass` over a real `BlockKVCache` window, the
VAE's `decode_first`/`decode_next`, the eager stream), which share no code with the export path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from livetalk_cli.cli import app
from livetalk_cli.errors import UserError
from livetalk_cli.export.contract import COMPONENTS, stack_text_kv
from livetalk_cli.export.load import engine_variants, load_engines, parse_backend
from livetalk_cli.media import load_audio, load_image
from livetalk_cli.models.dit import Conditioning
from livetalk_cli.pipeline import load_model
from livetalk_cli.runtime.scheduler import stream_video
from livetalk_cli.runtime.stream import AvatarStream, StreamOptions, blocks_for_video_frames, frames_to_uint8
from livetalk_cli.runtime.threads import intra_op_threads
from livetalk_cli.sampling.block_sampler import dit_pass
from livetalk_cli.sampling.kv_cache import BlockKVCache

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
pytest.importorskip("onnxscript", reason="the [onnx] extra is not installed")

ROOT = Path(__file__).resolve().parent.parent
FACE, SPEECH = ROOT / "examples" / "face.png", ROOT / "examples" / "speech.wav"
runner = CliRunner()
TINY = ["--preset", "tiny", "--random-weights", "--device", "cpu"]


def export(*args: str):
    return runner.invoke(app, ["export", *args])


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory) -> Path:
    """The tiny preset's four components as ONNX, exported once through the CLI."""
    root = tmp_path_factory.mktemp("engines")
    with intra_op_threads(1):
        res = export(*TINY, "--out", str(root))
    assert res.exit_code == 0, res.output
    (folder,) = root.iterdir()
    return folder


@pytest.fixture(scope="module")
def tiny():
    return load_model(random_weights=True, preset_name="tiny", device="cpu")


def stream_frames(model, seconds: float | None = None) -> np.ndarray:
    """The example's frames through render's loop (sequential, one thread): (T, H, W, 3) uint8."""
    wave = torch.from_numpy(load_audio(SPEECH, model.cfg.audio.sample_rate))
    if seconds is not None:
        wave = wave[: int(seconds * model.cfg.audio.sample_rate)]
    image = load_image(FACE, model.cfg.height, model.cfg.width, "crop")
    total = -(-len(wave) * model.cfg.fps // model.cfg.audio.sample_rate)
    with intra_op_threads(1):
        stream = AvatarStream(model, StreamOptions(pipelined=False, threads=1))
        stream.start(image, "a calm face", seed=3)
        n = blocks_for_video_frames(total, model.cfg.stream.block_frames, stream.tf)
        return np.concatenate([frames_to_uint8(v) for v in stream_video(stream, wave, n)])[:total]


def test_manifest_records_the_contract_and_parity(tiny_engines):
    for name in COMPONENTS:
        m = json.loads((tiny_engines / name / "manifest.json").read_text())
        assert m["component"] == name and m["model"]["name"] == "tiny" and m["dtype"] == "float32"
        assert tiny_engines.name == f"tiny-{m['weights_sha256']}"
        onnx = m["artifacts"]["onnx"]
        assert onnx["bytes"] == (tiny_engines / name / "model.onnx").stat().st_size > 10_000
        assert onnx["parity"]["max_abs"] < 1e-4 and onnx["parity"]["rel_l2"] < 1e-5
        assert {"torch", "onnx", "onnxruntime"} <= set(m["versions"])
        inputs = {s["name"]: s for s in m["contract"]["inputs"]}
        if name.startswith("dit"):
            assert inputs["past_k"]["shape"] == [4, 1, 9 * 16, 2, 32]  # layers, batch, (3 + 6) frames x 16 tokens
            assert inputs["mask"]["dtype"] == "bool"
        if name == "vae_step":
            assert len(m["contract"]["inputs"]) == len(m["contract"]["outputs"])  # z + slots -> frames + slots


def test_onnx_dit_passes_equal_eager_over_a_live_cache(tiny, tiny_engines):
    """A wrapped ring (relative RoPE), block after block: the engine's flow and K/V equal `dit_pass`'s."""
    engines = load_engines(tiny, tiny_engines, "dit=onnx,vae=eager")
    cfg, dit = tiny.cfg, tiny.dit
    h, w = cfg.latent_hw
    f = cfg.stream.block_frames
    cache = BlockKVCache(cfg.dit, cfg.stream, (h // 2, w // 2))
    g = torch.Generator().manual_seed(7)
    text = dit.prepare_text(torch.randn(1, cfg.dit.text_len, cfg.dit.text_dim, generator=g))
    for _ in range(6):  # 3 sinks + a 6-frame ring: wraps from block 3
        cond = Conditioning(text, torch.randn(1, cfg.dit.out_dim + 1, f, h, w, generator=g),
                            torch.randn(cfg.dit.num_audio_layers, 1, f, cfg.dit.dim, generator=g))
        x = torch.randn(1, cfg.dit.out_dim, f, h, w, generator=g)
        t = torch.full((1, f), 750.0)
        window = cache.window()
        with torch.no_grad():
            flow, _, _ = dit_pass(dit, x, t, cond, window)
            _, k_ref, v_ref = dit_pass(dit, x, torch.zeros(1, f), cond, window, keep_kv=True)
        assert engines.passes is not None
        got = engines.passes.denoise_pass(x, t, cond, window)
        k, v = engines.passes.refill_pass(x, torch.zeros(1, f), cond, window)
        torch.testing.assert_close(got, flow, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(k, k_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-4)
        cache.commit(k_ref, v_ref)
    assert cache.full and stack_text_kv(text)[0].shape[0] == cfg.dit.num_layers


def test_onnx_decoder_equals_eager_chunk_by_chunk(tiny, tiny_engines):
    engines = load_engines(tiny, tiny_engines, "dit=eager,vae=onnx")
    vae, dec = tiny.vae, engines.decoder
    assert dec is not None
    h, w = tiny.cfg.latent_hw
    z = torch.randn(1, tiny.cfg.vae.z_dim, 9, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_slots = vae.decode_first(z[:, :, :2])
        got, slots = dec.decode_first(z[:, :, :2])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        for a, b in ((2, 3), (3, 6), (6, 9)):  # chunks of 1 and 3 latents, as the stream decodes them
            ref, ref_slots = vae.decode_next(z[:, :, a:b], ref_slots)
            got, slots = dec.decode_next(z[:, :, a:b], slots)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert len(slots) == len(vae.decoder_slot_names())


@pytest.fixture(scope="module")
def demo_engines(tmp_path_factory) -> Path:
    """The embedded demo model's components as ONNX, and as TensorRT-RTX plans where it is installed."""
    import importlib.util

    root = tmp_path_factory.mktemp("demo-engines")
    fmts = "onnx,trt-rtx" if importlib.util.find_spec("tensorrt_rtx") else "onnx"
    with intra_op_threads(1):
        res = export("--out", str(root), "--device", "cpu", "--format", fmts)
    assert res.exit_code == 0, res.output
    return root


def test_render_with_onnx_engines_equals_eager_frame_by_frame(tmp_path, demo_engines):
    """The demo model on the example (5 s: the ring wraps, the VAE anchor and its fade run): every
    frame within 1/255 of the eager render's (the engines' float rounding differs from eager's)."""
    model = load_model(device="cpu")
    eager = stream_frames(model)
    model.engines = load_engines(model, demo_engines, "onnx")
    assert (model.engines.dit_backend, model.engines.vae_backend) == ("onnx", "onnx")
    engine = stream_frames(model)
    assert engine.shape == eager.shape == (80, 96, 96, 3)
    diff = np.abs(engine.astype(int) - eager.astype(int))
    assert diff.max() <= 1 and eager.std() > 10

    # the CLI: render --engine writes the video (the demo's engines, found under the root folder)
    out = tmp_path / "o.mp4"
    res = runner.invoke(app, ["render", str(SPEECH), "--image", str(FACE), "--out", str(out), "--engine",
                              str(demo_engines), "--engine-backend", "dit=onnx,vae=eager", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert out.stat().st_size > 10_000


def test_demo_components_build_as_tensorrt_rtx_plans(demo_engines):
    """Building is the proof TensorRT accepts the ONNX files (an RTX GPU is needed to run them)."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed: pip install 'livetalk[tensorrt-rtx]'")
    (folder,) = demo_engines.iterdir()
    for name in COMPONENTS:
        entry = json.loads((folder / name / "manifest.json").read_text())["artifacts"]["trt-rtx"]
        plan = folder / name / entry["file"]
        assert plan.name.startswith("engine_trtrtx") and plan.name.endswith("_sm89.plan")
        assert plan.stat().st_size == entry["bytes"] > 1_000_000
        assert entry["parity"] is None and "RTX GPUs" in entry["parity_note"]


def test_export_is_skipped_when_up_to_date_and_force_rebuilds(tiny_engines):
    files = {n: (tiny_engines / n / "model.onnx").stat().st_mtime_ns for n in COMPONENTS}
    res = export(*TINY, "--out", str(tiny_engines.parent))
    assert res.exit_code == 0 and "up to date" in res.output
    assert {n: (tiny_engines / n / "model.onnx").stat().st_mtime_ns for n in COMPONENTS} == files
    with intra_op_threads(1):
        res = export(*TINY, "--out", str(tiny_engines.parent), "--force", "--component", "vae_step")
    assert res.exit_code == 0, res.output
    assert (tiny_engines / "vae_step" / "model.onnx").stat().st_mtime_ns != files["vae_step"]
    assert (tiny_engines / "vae_first" / "model.onnx").stat().st_mtime_ns == files["vae_first"]
    assert not [p for p in tiny_engines.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("args, message", [
    (TINY + ["--seed", "1"], "was built for other weights"),
    (["--preset", "demo", "--random-weights", "--device", "cpu"], "built for preset 'tiny'"),
    (TINY + ["--dtype", "bfloat16"], "was built for float32"),
    (TINY + ["--engine-backend", "aoti"], "has no aoti build (it has onnx)"),
    (TINY + ["--engine-backend", "tensorrt"], "unknown engine backend"),
    (TINY + ["--compile"], "apply to eager only"),
])
def test_render_refuses_engines_built_for_something_else(tmp_path, tiny_engines, args, message):
    from tests.test_render import write_wav

    audio = write_wav(tmp_path / "a.wav", 0.5)
    out = tmp_path / "o.mp4"
    res = runner.invoke(app, ["render", str(audio), "--image", str(FACE), "--out", str(out),
                              "--engine", str(tiny_engines), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.count("error:") == 1 and "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.glob(".o.mp4*"))


def test_bench_refuses_another_shape_and_measures_engines(tiny_engines):
    res = runner.invoke(app, ["bench", *TINY, "--engine", str(tiny_engines), "--height", "32", "--speed-only"])
    assert res.exit_code == 2 and "another configuration" in res.output and "height 64 vs 32" in res.output
    res = runner.invoke(app, ["bench", *TINY, "--engine", str(tiny_engines), "--speed-only", "--repeats", "1",
                              "--warmup", "1", "--stream-minutes", "0", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "FPS" in res.output


def test_engine_variants_and_backend_parsing(tiny, tiny_engines):
    # tiny_engines is the model folder, as `load_engines` resolves it (EngineSet.path)
    assert engine_variants(tiny, tiny_engines) == ["dit=onnx,vae=eager", "dit=eager,vae=onnx", "onnx"]
    assert parse_backend("dit=onnx, vae=eager") == {"dit": "onnx", "vae": "eager"}
    assert parse_backend("aoti") == {"dit": "aoti", "vae": "aoti"}
    with pytest.raises(UserError, match="bad engine backend"):
        parse_backend("dit=onnx,unet=eager")
    auto = load_engines(tiny, tiny_engines)  # a CPU: the DiT on ONNX Runtime (no AOTI build), the VAE eager
    assert (auto.dit_backend, auto.vae_backend) == ("onnx", "eager")


def test_export_with_the_csrc_attention_op(tmp_path, tiny):
    """--attention csrc: each DiT layer is one livetalk::SinkRingAttention node (checked against eager
    by nothing here: ONNX Runtime has no kernel for it, so the manifest says so and --engine refuses
    it); TensorRT and flex are refused before the model loads. AOTInductor with the op: test_csrc."""
    onnx = pytest.importorskip("onnx")
    root = tmp_path / "engines"
    with intra_op_threads(1):
        res = export(*TINY, "--out", str(root), "--attention", "csrc")
    assert res.exit_code == 0, res.output
    (folder,) = root.iterdir()
    layers = tiny.cfg.dit.num_layers
    # the refill's last attention feeds only the flow, which it does not return
    for name, calls in (("dit_denoise", layers), ("dit_refill", layers - 1)):
        data = json.loads((folder / name / "manifest.json").read_text())
        assert data["attention"] == "csrc" and data["artifacts"]["onnx"]["parity"] is None
        assert "ONNX Runtime has no kernel" in data["artifacts"]["onnx"]["parity_note"]
        graph = onnx.load(str(folder / name / "model.onnx")).graph
        nodes = [n for n in graph.node if n.op_type == "SinkRingAttention" and n.domain == "livetalk"]
        assert len(nodes) == calls
    assert json.loads((folder / "vae_step" / "manifest.json").read_text())["attention"] == "sdpa"
    with pytest.raises(UserError, match="which ONNX Runtime cannot run: use --engine-backend aoti"):
        load_engines(tiny, folder, "onnx")
    assert load_engines(tiny, folder).dit_backend == "eager"  # auto passes over the ONNX graphs
    for args, message in ((["--format", "trt-rtx"], "TensorRT needs the csrc plugin"), ([], "sdpa or csrc")):
        res = export(*TINY, "--out", str(root), *args, "--attention", "csrc" if args else "flex")
        assert res.exit_code == 2 and message in res.output, res.output


def test_corrupt_or_truncated_artifacts_are_one_line(tmp_path, tiny, tiny_engines):
    broken = tmp_path / tiny_engines.name
    shutil.copytree(tiny_engines, broken)
    onnx = broken / "dit_refill" / "model.onnx"
    data = onnx.read_bytes()
    onnx.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or changed"):
        load_engines(tiny, broken, "onnx")
    onnx.write_bytes(b"\0garbage" * (len(data) // 8) + b"\0" * (len(data) % 8))  # the recorded size, not ONNX
    with pytest.raises(UserError, match="cannot load ONNX model") as e:
        load_engines(tiny, broken, "onnx")
    assert "\n" not in str(e.value)
    (broken / "vae_first" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        load_engines(tiny, broken, "dit=eager,vae=onnx")


def test_tensorrt_engines_need_their_gpu(tmp_path, tiny, tiny_engines):
    """A plan recorded in the manifests: on a CPU `--engine-backend trt` is one line, and `auto` skips it."""
    folder = tmp_path / tiny_engines.name
    shutil.copytree(tiny_engines, folder)
    for name in COMPONENTS:
        path = folder / name / "manifest.json"
        m = json.loads(path.read_text())
        m["artifacts"]["trt"] = {"file": "engine_trt10.13.0_sm90.plan", "version": "10.13.0", "sm": "90",
                                 "bytes": 4}
        (folder / name / "engine_trt10.13.0_sm90.plan").write_bytes(b"plan")
        path.write_text(json.dumps(m))
    with pytest.raises(UserError, match="TensorRT engines need a CUDA device"):
        load_engines(tiny, folder, "trt")
    assert load_engines(tiny, folder).dit_backend == "onnx"


def test_a_failed_export_leaves_nothing_half_written(tmp_path, monkeypatch):
    from livetalk_cli.export import backends

    real = backends.export_onnx
    calls = []

    def disk_full_on_the_second(component, path):
        calls.append(component.contract.component)
        if len(calls) == 2:
            path.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real(component, path)

    monkeypatch.setattr(backends, "export_onnx", disk_full_on_the_second)
    with intra_op_threads(1):
        res = export(*TINY, "--out", str(tmp_path), "--component", "vae_first", "--component", "vae_step")
    assert res.exit_code == 2 and "No space left on device" in res.output, res.output
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["vae_first"]  # the finished component only
    assert sorted(p.name for p in (folder / "vae_first").iterdir()) == ["manifest.json", "model.onnx"]

    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        res = export(*TINY, "--out", str(ro / "engines"))
        if os.access(ro, os.W_OK):  # root ignores permission bits: use a path that cannot be created
            res = export(*TINY, "--out", "/proc/engines")
        assert res.exit_code == 2 and "not writable" in res.output and len(res.output.strip().splitlines()) == 1
    finally:
        os.chmod(ro, 0o700)


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    import importlib.util

    import livetalk_cli.pipeline

    def no_model(**_):
        raise AssertionError("the model was loaded before the extra was checked")

    monkeypatch.setattr(livetalk_cli.pipeline, "load_model", no_model)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    res = export(*TINY, "--out", "/tmp/never-written")
    assert res.exit_code == 2 and "pip install 'livetalk[onnx]'" in res.output
    res = export(*TINY, "--format", "onnx,tensorrt")
    assert res.exit_code == 2 and "unknown format(s) tensorrt" in res.output
    assert not Path("/tmp/never-written").exists()


@pytest.mark.slow
def test_aoti_components_and_stream_equal_eager(tmp_path, tiny):
    """AOTInductor (inductor compiles: minutes on a busy 2-core machine, so in the slow run)."""
    with intra_op_threads(2):
        res = export(*TINY, "--out", str(tmp_path), "--format", "aoti")
    assert res.exit_code == 0, res.output
    (folder,) = tmp_path.iterdir()
    for name in COMPONENTS:
        par = json.loads((folder / name / "manifest.json").read_text())["artifacts"]["aoti"]["parity"]
        assert par["rel_l2"] < 1e-5, (name, par)
    eager = stream_frames(tiny, seconds=2.0)
    tiny.engines = load_engines(tiny, folder, "aoti")
    try:
        got = stream_frames(tiny, seconds=2.0)
    finally:
        tiny.engines = None
    assert np.abs(got.astype(int) - eager.astype(int)).max() <= 1
    auto = load_engines(tiny, folder)  # a CPU: the DiT on AOTInductor, the VAE eager
    assert (auto.dit_backend, auto.vae_backend) == ("aoti", "eager")
    assert auto.passes is not None and auto.passes.denoise.cabi is not None  # the GIL-free C ABI runner
    pt2 = folder / "vae_step" / "model.pt2"
    pt2.write_bytes(b"PK\x03\x04" + b"\0" * (pt2.stat().st_size - 4))  # same size, not a package
    with pytest.raises(UserError, match="cannot load AOTInductor package"):
        load_engines(tiny, folder, "aoti")
