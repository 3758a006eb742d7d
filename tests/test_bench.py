"""`livetalk bench` and the streaming pipeline it measures (tiny preset, random weights, CPU).

Figures are checked for being produced and consistent with each other, never for a speed.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from livetalk_cli.bench import BenchSettings, configure, first_frame_latency, frames_of_blocks
from livetalk_cli.cli import app
from livetalk_cli.pipeline import load_model
from livetalk_cli.runtime.scheduler import stream_video
from livetalk_cli.runtime.stream import AvatarStream, StreamOptions, frames_to_uint8

runner = CliRunner()
FAST = ["--preset", "tiny", "--random-weights", "--device", "cpu", "--warmup", "1", "--repeats", "1",
        "--stage-blocks", "2"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = load_model(preset_name="tiny", random_weights=True, device="cpu", dtype="float32", seed=3)
    with torch.no_grad():  # Wan zero-inits the output head: give the DiT a visible effect on frames
        m.dit.head.head.weight.normal_(0, 0.2)
    return m


def inputs(model, seconds: float = 4.0):
    sr = model.cfg.audio.sample_rate
    g = torch.Generator().manual_seed(1)
    wave = 0.3 * torch.randn(int(seconds * sr), generator=g)
    image = torch.rand(3, model.cfg.height, model.cfg.width, generator=g) * 2 - 1
    return wave, image


def run_stream(model, options: StreamOptions, n_blocks: int = 5) -> np.ndarray:
    wave, image = inputs(model)
    stream = AvatarStream(model, options)
    stream.start(image, "a person talking", seed=11)
    return np.concatenate([frames_to_uint8(v) for v in stream_video(stream, wave, n_blocks)])


def test_pipelined_and_sequential_streams_give_identical_frames(model):
    seq = run_stream(model, StreamOptions(pipelined=False))
    pipe = run_stream(model, StreamOptions(pipelined=True))
    wave, image = inputs(model)
    stream = AvatarStream(model)  # the one-call path render used before the pipeline
    stream.start(image, "a person talking", seed=11)
    whole = np.concatenate([frames_to_uint8(stream.next_block(wave)) for _ in range(5)])
    assert seq.shape == (frames_of_blocks(5, stream), model.cfg.height, model.cfg.width, 3)
    assert seq.std() > 1.0  # the frames carry signal, so equality below means something
    np.testing.assert_array_equal(seq, pipe)
    np.testing.assert_array_equal(seq, whole)


def test_first_block_decodes_its_first_generated_frame_early(model):
    wave, image = inputs(model)
    stream = AvatarStream(model, StreamOptions(pipelined=False))
    stream.start(image, "", seed=0)
    sizes = [v.shape[2] for v in stream_video(stream, wave, 2)]
    tf, bf = model.cfg.vae.temporal_factor, model.cfg.stream.block_frames
    assert sizes == [1 + tf, tf * (bf - 2), tf * bf]  # reference + first latent, rest of block 0, block 1


@pytest.mark.slow  # inductor's C++ compiles: ~20 s quiet, minutes on a busy machine (`pytest -m slow`)
def test_compiled_stream_matches_eager(model):
    torch._dynamo.reset()
    eager = run_stream(model, StreamOptions(pipelined=False), n_blocks=3)
    compiled = run_stream(model, StreamOptions(pipelined=True, compile=True, compile_backend="inductor"), n_blocks=3)
    assert np.abs(eager.astype(int) - compiled.astype(int)).max() <= 1  # rounding of fp32 reassociation


@pytest.mark.parametrize("fail_at, arrived", [(1, 0), (3, 3)])  # block 0 (sampled by the caller on CPU), block 2
def test_pipeline_worker_error_reaches_the_caller_and_the_thread_ends(model, monkeypatch, fail_at, arrived):
    wave, image = inputs(model)
    stream = AvatarStream(model, StreamOptions(pipelined=True))
    stream.start(image, "", seed=0)
    calls = {"n": 0}
    real = stream.sampler.denoise

    def failing(noise, audio):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError(f"boom in block {fail_at}")
        return real(noise, audio)

    monkeypatch.setattr(stream.sampler, "denoise", failing)
    before, threads = threading.active_count(), torch.get_num_threads()
    got = []
    with pytest.raises(RuntimeError, match=f"boom in block {fail_at}"):
        for v in stream_video(stream, wave, 6):
            got.append(v)
    assert len(got) == arrived  # block 0 (two chunks) and block 1 arrive before an error in block 2
    assert torch.get_num_threads() == threads
    stream.close()
    assert threading.active_count() == before


def test_closing_a_pipelined_stream_early_stops_its_worker(model):
    wave, image = inputs(model)
    stream = AvatarStream(model, StreamOptions(pipelined=True))
    stream.start(image, "", seed=0)
    before, threads = threading.active_count(), torch.get_num_threads()
    chunks = stream_video(stream, wave, 50)
    next(chunks)
    chunks.close()  # returns only once the worker has left the stream
    assert torch.get_num_threads() == threads  # the CPU thread split is undone
    assert stream.block < 50  # bounded queue: the worker did not run to the end
    assert first_frame_latency(stream, wave, image, "") > 0  # the stream restarts cleanly
    assert threading.active_count() == before + 1  # one DiT thread per stream, reused
    stream.close()
    assert threading.active_count() == before


def test_bench_cli_produces_consistent_figures(tmp_path):
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", *FAST, "--stream-minutes", "0.1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["machine"]["device_type"] == "cpu" and r["machine"]["torch"] == torch.__version__
    assert r["model"]["dtype"] == "float32" and (r["model"]["height"], r["model"]["width"]) == (64, 64)
    for key in ("fps", "first_frame_s"):
        s = r[key]
        assert 0 < s["min"] <= s["median"] <= s["max"]
    assert r["realtime_factor"] == pytest.approx(r["fps"]["median"] / 16)
    steps = r["model"]["steps"]
    stages = r["stages_s"]
    assert [k for k in stages if k.startswith("denoise pass")] == [f"denoise pass {i + 1}" for i in range(steps)]
    assert all(v["median"] > 0 for v in stages.values())
    fl = r["flops"]
    per_frame = fl["dit_per_frame"] + fl["vae_decode_per_frame"]
    assert fl["dit_per_frame"] > 0 and fl["vae_decode_per_frame"] > 0 and fl["first_frame"] > 0
    assert 0.05 * fl["dit_per_frame"] < fl["dit_attention_per_frame"] < fl["dit_per_frame"]  # counted on CPU
    # the first frame costs the first block's 4 passes: more than one frame of the steady state
    assert fl["first_frame"] > per_frame
    assert fl["floor_fps"] == pytest.approx(fl["matmul_flop_per_s"] / per_frame)
    assert fl["floor_fps"] > r["fps"]["median"]  # nothing runs faster than its FLOP floor
    mem = r["memory_stream"]
    assert mem["minutes"] >= 0.1 and mem["flat"], mem
    assert r["latency_budget"]["audio_before_first_block_s"] == pytest.approx(9 / 16)
    assert "steady-state FPS" in res.output and "LiveTalk (published)" in res.output


def test_bench_compare_and_overrides(model):
    """--compare's rows and gains, with the bench's overrides applied (the variants measured in
    this process here; the CLI runs each in a fresh one, tested below for one variant)."""
    from livetalk_cli.bench import measure_variant, run_bench

    settings = BenchSettings(sinks=0, window=6, steps=2, height=32, width=48, warmup=1, repeats=1, stage_blocks=2,
                             stream_minutes=0, compare=True)
    seen: list[str] = []

    def in_process(v: StreamOptions, engine_backend: str | None) -> dict:
        assert engine_backend is None  # no --engine: the switches only
        seen.append(v.label())
        m = configure(model, settings)
        wave, image = inputs(m, seconds=12.0)
        return measure_variant(m, v, wave, image, "", settings)

    r = run_bench(model, StreamOptions(compile_backend="eager"), settings, run_variant=in_process)
    assert (r["model"]["height"], r["model"]["width"], r["model"]["steps"]) == (32, 48, 2)
    assert (r["model"]["sink_frames"], r["model"]["window_frames"]) == (0, 6)
    rows = r["compare"]
    assert [c["options"] for c in rows] == seen == ["sequential eager", "pipelined", "pipelined+compile"]
    for row in rows[1:]:  # gains are against the first (sequential eager) row, each from its own run
        assert row["fps"]["median"] > 0 and row["first_frame_s"]["median"] > 0
        assert row["fps_gain"] == pytest.approx(row["fps"]["median"] / rows[0]["fps"]["median"])
        assert row["first_frame_gain"] == pytest.approx(rows[0]["first_frame_s"]["median"]
                                                        / row["first_frame_s"]["median"])
    assert "memory_stream" not in r


def test_a_compare_variant_runs_in_a_fresh_process():
    from livetalk_cli.bench_compare import variant_in_subprocess

    args = ["--preset", "tiny", "--random-weights", "--device", "cpu", "--warmup", "1", "--repeats", "1",
            "--height", "32", "--width", "32"]
    row = variant_in_subprocess(args, StreamOptions(pipelined=True, threads=1))
    assert row["options"] == "pipelined" and row["fps"]["median"] > 0 and row["first_frame_s"]["median"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--blocks", "5"], "at least 20"),
        (["--height", "40"], "multiples of"),
        (["--window", "4"], "window"),
        (["--cuda-graphs"], "CUDA"),
        (["--json", "/nonexistent/dir/b.json"], "does not exist"),
        (["--json", "/proc/b.json"], "not writable"),  # found before any measuring
        (["--dtype", "float8"], "'float8' is not one of"),
        (["--preset", "wan9"], "'wan9' is not one of"),
    ],
)
def test_bench_bad_options_fail_cleanly(args, message):
    res = runner.invoke(app, ["bench", *FAST, "--stream-minutes", "0", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_configure_keeps_weights_and_validates(model):
    m = configure(model, BenchSettings(height=128, width=64, block_frames=2, sinks=2, window=4))
    assert m.dit is model.dit and (m.cfg.height, m.cfg.width) == (128, 64)
    assert m.cfg.stream.block_frames == 2 and model.cfg.stream.block_frames == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_and_cuda_stream_pipeline_match_eager():
    m = load_model(preset_name="tiny", random_weights=True, device="cuda", dtype="float32", seed=3)
    eager = run_stream(m, StreamOptions(pipelined=False))
    graphs = run_stream(m, StreamOptions(pipelined=True, cuda_graphs=True))
    assert np.abs(eager.astype(int) - graphs.astype(int)).max() <= 1


def test_cuda_graph_argument_slots_round_trip():
    """What CudaGraphed copies into static buffers (the capture itself needs CUDA)."""
    from livetalk_cli.models.attention import KVWindow
    from livetalk_cli.models.dit import Conditioning
    from livetalk_cli.sampling.accel import _signature, _with_tensors

    module = torch.nn.Linear(2, 2)
    window = KVWindow(torch.zeros(1, 1, 2, 1, 2), torch.zeros(1, 1, 2, 1, 2), torch.ones(2, 1), torch.ones(2, 1), None)
    cond = Conditioning([(torch.ones(1, 3), torch.zeros(1, 3))], None, torch.ones(2))
    args = (module, window, torch.randn(4), cond)
    leaves, key = _signature(args)
    assert len(leaves) == 4  # noise, text k, text v, audio; the module and the cache's window by address
    back = _with_tensors(args, [t.clone() for t in leaves])
    assert back[0] is module and back[1] is window and back[3].y is None
    assert torch.equal(back[3].text_kv[0][0], cond.text_kv[0][0]) and back[3].text_kv[0][0] is not cond.text_kv[0][0]
    assert _signature(args)[1] == key
    other_window = KVWindow(window.k, window.v, window.cos, window.sin, torch.ones(1, 1, 1, 4, dtype=torch.bool))
    for changed in ((module, window, torch.randn(5), cond),  # a new shape: re-capture
                    (module, window, torch.randn(4), Conditioning(cond.text_kv, torch.ones(1), cond.audio)),
                    (module, other_window, torch.randn(4), cond)):  # the masked window: another graph
        assert _signature(changed)[1] != key
