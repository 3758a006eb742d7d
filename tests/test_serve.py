"""serve-local over its WebSocket API, driven by the package's Python client on loopback (demo model,
CPU): a served session equals `render`'s stream for the audio it played, interruption, prompt
changes that keep the cache, responders, refusals that leave the server serving, and sessions
that leave nothing behind."""

from __future__ import annotations

import base64
import ctypes
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("websockets")

from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from livetalk_cli.media import load_audio, load_image  # noqa: E402
from livetalk_cli.pipeline import load_model  # noqa: E402
from livetalk_cli.runtime.session import AvatarSession  # noqa: E402
from livetalk_cli.runtime.stream import AvatarStream, StreamOptions, frames_to_uint8  # noqa: E402
from livetalk_cli.serve.app import IO_THREADS, ServerConfig, serve_in_thread  # noqa: E402
from livetalk_cli.serve.client import AvatarClient  # noqa: E402
from livetalk_cli.serve.live import LiveSession  # noqa: E402
from livetalk_cli.serve.protocol import Limits, from_pcm16, to_pcm16  # noqa: E402
from livetalk_cli.serve.responders import parse_responder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACE = (ROOT / "examples" / "face.png").read_bytes()


@pytest.fixture(scope="module")
def model():
    return load_model(checkpoint=None, preset_name=None, random_weights=False, device=torch.device("cpu"),
                      dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """The example's speech as the server hears it: PCM16-exact float32 at 16 kHz."""
    return from_pcm16(to_pcm16(load_audio(ROOT / "examples" / "speech.wav")))


def _reference(model, timeline: np.ndarray, prompts: dict[int, str], first_prompt: str, frames: int) -> np.ndarray:
    """`render`'s per-block sequence (sequential) over the audio the session played, the prompt
    changed before the block starting at each frame in `prompts`."""
    image = load_image(ROOT / "examples" / "face.png", model.cfg.height, model.cfg.width)
    stream = AvatarStream(model, StreamOptions(pipelined=False))
    stream.start(image, first_prompt, seed=0)
    wave = torch.from_numpy(np.concatenate([timeline, np.zeros(model.cfg.audio.sample_rate * 2, np.float32)]))
    out = []
    with torch.no_grad():
        while sum(len(f) for f in out) < frames:
            start = stream.video_range()[0]
            if start in prompts:
                stream.set_prompt(prompts[start])
            out.append(frames_to_uint8(stream.next_block(wave)))
    return np.concatenate(out)[:frames]


def _speech_at(timeline: np.ndarray, frame: int, spf: int, turn: np.ndarray) -> int:
    """The sample where `turn` starts in the timeline, searched within the frame the server named."""
    for s in range(frame * spf, (frame + 1) * spf):
        if np.array_equal(timeline[s: s + len(turn)], turn):
            return s
    raise AssertionError(f"the turn's audio is not in the timeline at frame {frame}")


def test_two_turns_equal_render_of_the_played_audio_and_a_prompt_change_keeps_the_cache(model, speech):
    spf = model.cfg.audio.sample_rate // model.cfg.fps
    turns = [speech[: int(1.5 * 16000)], speech[int(1.5 * 16000): int(3.0 * 16000)]]
    with serve_in_thread(model, ServerConfig()) as url, AvatarClient.connect(url) as c:
        info = c.start(FACE, "a person talking", video="raw")
        assert info["protocol"] == 1 and (info["width"], info["height"]) == (model.cfg.width, model.cfg.height)
        c.send_pcm(turns[0])
        c.end_turn()
        c.wait_event("turn_ended", turn=1, timeout=30)
        c.prompt("a person smiling")
        changed = c.wait_event("prompt_set", timeout=10)
        c.send_pcm(turns[1], realtime=True)  # streamed as a microphone would
        c.end_turn()
        c.wait_event("turn_ended", turn=2, timeout=30)
        n_idle = max(c.frames) + 30  # the avatar idles on after the turns (it never freezes)
        c.wait_frames(n_idle, timeout=30)
        c.close()
        c.wait_event("closed")
        starts = [c.wait_event("turn_started", turn=t) for t in (1, 2)]
        states = {e["state"] for _, e in c.events if e["type"] == "state"}

    n = max(c.frames) + 1
    assert sorted(c.frames) == list(range(n)), "frames arrive numbered without gaps"
    timeline = c.timeline_audio()
    assert len(timeline) == n * spf, "the audio of exactly the frames sent came with them"
    placed = [_speech_at(timeline, s["frame"], spf, t) for s, t in zip(starts, turns, strict=True)]
    assert placed[0] + len(turns[0]) <= placed[1], "turns play in order"
    silent = np.ones(len(timeline), bool)
    for p, t in zip(placed, turns, strict=True):
        silent[p: p + len(t)] = False
    assert not timeline[silent].any(), "between and after the turns the avatar hears silence"
    assert {"idle", "speaking"} <= states

    got = np.stack([c.frames[i] for i in range(n)])
    want = _reference(model, timeline, {changed["frame"]: "a person smiling"}, "a person talking", n)
    assert got.std() > 10  # real frames: the comparison below means something
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_interrupt_stops_speech_within_one_block_and_the_avatar_idles_on(model, speech):
    spf = model.cfg.audio.sample_rate // model.cfg.fps
    block = model.cfg.stream.block_frames * model.cfg.vae.temporal_factor
    with serve_in_thread(model, ServerConfig()) as url, AvatarClient.connect(url) as c:
        c.start(FACE, video="raw")
        c.send_pcm(speech[: 5 * 16000])  # 5 s queued at once
        c.wait_event("turn_started", timeout=30)
        first = model.cfg.vae.temporal_factor * (model.cfg.stream.block_frames - 1) + 1  # block 0's frames
        received = first + block * -(-(max(c.frames) + 20 - first) // block)  # a block boundary
        c.wait_frames(received, timeout=30)
        c.interrupt()
        cut = c.wait_event("interrupted", timeout=10)["frame"]
        ended = c.wait_event("turn_ended", turn=1, timeout=10)
        c.wait_frames(cut + 24, timeout=30)  # frames go on after the cut: the avatar listens
        timeline = c.timeline_audio()
    assert ended.get("interrupted") is True and ended["frame"] == cut
    assert cut - received <= block, f"speech went on {cut - received} frames past what the client had"
    assert timeline[: cut * spf].any() and not timeline[cut * spf:].any()
    assert cut * spf < 5 * 16000  # the interruption did cut the turn short


def test_refused_messages_get_one_error_line_and_the_session_carries_on(model):
    limits = Limits(max_message_bytes=2**20)
    with serve_in_thread(model, ServerConfig(limits=limits)) as url:
        with AvatarClient.connect(url) as c:
            c.ws.send(b"\x00\x01")  # audio before start
            c.ws.send("{not json")
            c.send({"type": "dance"})
            c.send({"type": "start", "image": "***"})
            c.send({"type": "start", "image": base64.b64encode(b"not an image").decode()})
            c.send({"type": "start", "image": base64.b64encode(FACE).decode(), "seed": "zero"})
            deadline = time.monotonic() + 10
            while len([e for _, e in c.events if e["type"] == "error"]) < 6 and time.monotonic() < deadline:
                time.sleep(0.02)
            codes = [e["code"] for _, e in c.events if e["type"] == "error"]
            assert codes == ["no_session", "bad_json", "unknown_type", "bad_field", "bad_media", "bad_field"]
            assert all("Traceback" not in e["message"] and "\n" not in e["message"] for _, e in c.events)
            c.start(FACE)  # the connection still works
            c.ws.send(b"\x00")  # odd PCM16 length
            c.send({"type": "end_turn"})  # no turn open
            assert c.wait_event("error", code="bad_audio")
            assert c.wait_event("error", code="no_turn")
            c.wait_frames(5)
        with AvatarClient.connect(url) as big:  # over the message limit: that connection is closed
            big.ws.send(b"\x00" * (2**20 + 2))
            assert big.closed.wait(10)
        with AvatarClient.connect(url) as again:  # the server serves on
            again.start(FACE)
            again.wait_frames(1)


def test_token_origin_and_busy(model):
    cfg = ServerConfig(token="s3cret", max_sessions=1)
    with serve_in_thread(model, cfg) as url:
        ws_url = url.replace("http", "ws") + "/v1/ws"
        for bad in (ws_url, ws_url + "?token=wrong"):
            with pytest.raises(InvalidStatus):
                connect(bad, open_timeout=5)
        with pytest.raises(InvalidStatus):  # a page from another origin
            connect(ws_url + "?token=s3cret", origin="http://evil.example", open_timeout=5)
        with AvatarClient.connect(url, token="s3cret") as c, AvatarClient.connect(url, token="s3cret") as d:
            c.start(FACE)
            with pytest.raises(RuntimeError, match="busy"):
                d.start(FACE)
    with pytest.raises(Exception, match="--token"):
        ServerConfig(host="0.0.0.0").check()


def _threads() -> int:
    """Threads, less the server's I/O pool (it grows to a fixed size as needed)."""
    pool = [t for t in threading.enumerate() if t.name.startswith("livetalk-io")]
    assert len(pool) <= IO_THREADS
    return threading.active_count() - len(pool)


def _rss_mb() -> float:
    """Resident memory after a collection, with freed heap handed back to the system where glibc can."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_concurrent_sessions_and_a_disconnect_storm_leave_nothing_behind(model):
    with serve_in_thread(model, ServerConfig(max_sessions=64, limits=Limits(max_sessions_per_client=64))) as url:
        def storm(n: int) -> None:
            def one() -> None:
                with AvatarClient.connect(url) as c:
                    c.start(FACE)
                    c.send_pcm(np.zeros(8000, np.float32))
                    c.wait_frames(1, timeout=60)
                # leaves without close or end_turn, mid-stream
            workers = [threading.Thread(target=one) for _ in range(n)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(120)

        def health() -> dict:
            import urllib.request
            with urllib.request.urlopen(url + "/v1/health", timeout=5) as r:
                return json.loads(r.read())

        def settled() -> None:
            deadline = time.monotonic() + 20
            while health()["sessions"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert health()["sessions"] == 0

        # two sessions at once keep up with real time on the demo model
        clients = [AvatarClient.connect(url) for _ in range(2)]
        sessions = [cm.__enter__() for cm in clients]
        for s in sessions:
            s.start(FACE)
        t0 = time.monotonic()
        time.sleep(4.0)
        for s in sessions:
            stats = [e for _, e in s.events if e["type"] == "stats"]
            assert stats and stats[-1]["sessions"] == 2
            assert len(s.frames) >= 0.75 * 16 * (time.monotonic() - t0), "a session fell behind real time"
        for cm in clients:
            cm.__exit__(None, None, None)
        settled()

        storm(16)  # the allocator's high-water mark for 16 sessions at once
        settled()
        threads, rss = _threads(), _rss_mb()
        storm(16)
        settled()
        time.sleep(0.5)
        gc.collect()
        assert not [o for o in gc.get_objects() if type(o) in (LiveSession, AvatarSession)], "a session leaked"
        assert _threads() <= threads, (threading.enumerate(), threads)
        assert _rss_mb() - rss < 20, f"RSS grew {_rss_mb() - rss:.0f} MB over a second storm of 16 sessions"


def test_responders(tmp_path, model, speech):
    reply = speech[16000: 16000 + 12000]
    wav = tmp_path / "reply.wav"
    from livetalk_cli.media import write_wav

    write_wav(wav, reply)
    prog = tmp_path / "halve.py"  # a local "TTS": the user's turn at half volume, reversed
    prog.write_text("import sys, io, numpy as np, av\n"
                    "c = av.open(io.BytesIO(sys.stdin.buffer.read()))\n"
                    "x = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)[0]\n"
                    "y = (x[::-1] // 2).astype(np.int16)\n"
                    "o = io.BytesIO(); out = av.open(o, 'w', format='wav')\n"
                    "s = out.add_stream('pcm_s16le', rate=16000, layout='mono')\n"
                    "fr = av.AudioFrame.from_ndarray(y[None], format='s16', layout='mono'); fr.sample_rate = 16000\n"
                    "[out.mux(p) for p in s.encode(fr)]; [out.mux(p) for p in s.encode(None)]; out.close()\n"
                    "sys.stdout.buffer.write(o.getvalue())\n")
    user = speech[: 8000]
    halved = from_pcm16(((np.round(user * 32768).astype(np.int16)[::-1]) // 2).astype("<i2").tobytes())
    for spec, want in ((f"file:{wav}", from_pcm16(to_pcm16(load_audio(wav)))),
                       (f"command:{sys.executable} {prog}", halved)):
        with serve_in_thread(model, ServerConfig(responder=parse_responder(spec))) as url, \
                AvatarClient.connect(url) as c:
            c.start(FACE, video="raw")
            c.send_pcm(user)
            assert c.wait_event("state", state="listening", timeout=10)
            c.end_turn()
            started = c.wait_event("turn_started", timeout=30)
            c.wait_event("turn_ended", timeout=30)
            c.wait_frames(max(c.frames) + 2)
            timeline = c.timeline_audio()
            spf = model.cfg.audio.sample_rate // model.cfg.fps
            _speech_at(timeline, started["frame"], spf, want)
            assert not timeline[: started["frame"] * spf].any(), "the user's own audio is not spoken back"
    with pytest.raises(Exception, match="responder"):
        parse_responder("carrier-pigeon:x")


def test_http_responder_posts_the_turn_and_speaks_the_reply(speech):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from livetalk_cli.serve.responders import ResponderError, wav_bytes

    got: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            got.append(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/fail":
                self.send_error(500)
                return
            body = wav_bytes(speech[:4000] * 0.5)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        reply = parse_responder(f"http:{base}/reply").reply(speech[:8000], timeout=10)
        assert got[0][:4] == b"RIFF" and len(got[0]) == 44 + 2 * 8000  # the turn, as a PCM16 WAV
        np.testing.assert_allclose(reply, speech[:4000] * 0.5, atol=1 / 32767)
        with pytest.raises(ResponderError, match="500"):
            parse_responder(f"http:{base}/fail").reply(speech[:100], timeout=10)
    finally:
        httpd.shutdown()


def test_cli_refuses_an_open_host_without_a_token_and_bench_serve_measures(tmp_path):
    from typer.testing import CliRunner

    from livetalk_cli.cli import app

    res = CliRunner().invoke(app, ["serve-local", "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "--token" in res.output
    res = CliRunner().invoke(app, ["serve-local", "--responder", "telepathy"])
    assert res.exit_code == 2 and "responder" in res.output
    out = tmp_path / "serve.json"
    res = CliRunner().invoke(app, ["bench", "--serve", "--sessions", "1", "--serve-seconds", "6", "--turns", "1",
                                   "--stream-minutes", "0", "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    for row in r["latency"]:
        assert 0 < row["received_s"]["median"] <= row["mouth_to_ear_s"]["median"] < 10
    assert r["sessions"][0]["fps"][0] > 5 and "most sessions in real time" in res.output


def test_a_silent_client_is_timed_out_and_its_session_freed(model):
    with serve_in_thread(model, ServerConfig(limits=Limits(idle_timeout_s=1.5))) as url, \
            AvatarClient.connect(url) as c:
        c.start(FACE)
        assert c.wait_event("error", code="idle_timeout", timeout=20)
        assert c.closed.wait(10)


def test_a_failing_responder_is_an_error_line_and_an_interrupt_drops_a_late_reply(tmp_path, model, speech):
    slow = tmp_path / "slow.py"  # answers after 2 s with its input
    slow.write_text("import sys, time\ndata = sys.stdin.buffer.read()\ntime.sleep(2)\nsys.stdout.buffer.write(data)\n")
    for spec in (f"command:{sys.executable} -c 'import sys; sys.exit(3)'", f"command:{sys.executable} {slow}"):
        with serve_in_thread(model, ServerConfig(responder=parse_responder(spec))) as url, \
                AvatarClient.connect(url) as c:
            c.start(FACE, video="raw")
            c.send_pcm(speech[:8000])
            c.end_turn()
            if "exit" in spec:
                assert "exited with 3" in c.wait_event("error", code="responder", timeout=20)["message"]
            else:
                assert c.wait_event("state", state="thinking", timeout=10)
                c.interrupt()
            deadline = time.monotonic() + 20
            while [e["state"] for _, e in c.events if e["type"] == "state"][-1:] != ["idle"]:
                assert time.monotonic() < deadline, "the session did not go back to idle"
                time.sleep(0.05)
            time.sleep(2.5)  # the slow reply has come back by now: dropped
            assert not [e for _, e in c.events if e["type"] == "turn_started"]
            assert not c.timeline_audio().any()
            stats = [e for _, e in c.events if e["type"] == "stats"][-1]
            assert stats["realtime"] is True and stats["state"] == "idle"
