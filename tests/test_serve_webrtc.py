"""serve-local's WebRTC output (serve/webrtc.py): its buffers on a stand-in session, and an aiortc client
on loopback that negotiates through the WebSocket API (demo model, CPU) and receives the avatar's
frames and speech: they equal what the session made, audio and video are sent on the same clock, and
closing the connection leaves no aiortc tasks behind."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("aiortc")

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from livetalk_cli.media import load_audio  # noqa: E402
from livetalk_cli.pipeline import load_model  # noqa: E402
from livetalk_cli.runtime.session import AvatarSession  # noqa: E402
from livetalk_cli.serve import webrtc  # noqa: E402
from livetalk_cli.serve.app import ServerConfig, serve_in_thread  # noqa: E402
from livetalk_cli.serve.live import MediaBlock  # noqa: E402
from livetalk_cli.serve.protocol import AUDIO_PCM16, VIDEO_RAW, from_pcm16, to_pcm16, unpack_media  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACE = (ROOT / "examples" / "face.png").read_bytes()


def _block(frame0: int, t: int, spf: int) -> MediaBlock:
    frames = np.stack([np.full((4, 4, 3), (frame0 + i) % 256, np.uint8) for i in range(t)])
    audio = (np.arange(frame0 * spf, (frame0 + t) * spf) % 1000).astype(np.float32) / 1000
    return MediaBlock(frame0, frames, audio)


def test_buffers_are_bounded_and_looked_up_by_timeline():
    clock = SimpleNamespace(pos=0.0)
    session = SimpleNamespace(fps=10, spf=100, rate=1000, position=lambda now=None: clock.pos)
    out = webrtc.RtcOutput(session)  # type: ignore[arg-type]
    for k in range(4):
        out.push(_block(4 * k, 4, 100))
    assert out.ready.is_set() and len(out.blocks) == 4
    assert out.frame(upto=5, after=-1)[0] == 5 and out.frame(upto=5, after=-1)[1][0, 0, 0] == 5
    assert out.frame(upto=100, after=-1)[0] == 15  # the newest made
    assert out.frame(upto=5, after=5) is None  # nothing newer than what was shown
    chunk, made = out.audio(1550, 100)
    assert made == 50 and np.allclose(chunk[:50], (np.arange(1550, 1600) % 1000) / 1000) and not chunk[50:].any()
    assert out.audio(5000, 10)[1] == 0
    clock.pos = 1.5 + webrtc.KEEP_S  # blocks that ended before 1.5 s are dropped on the next push
    out.push(_block(16, 4, 100))
    assert [b.frame0 for b in out.blocks] == [12, 16]
    for k in range(5, 5 + 2 * webrtc.MAX_BLOCKS):
        out.push(_block(4 * k, 4, 100))
    assert len(out.blocks) == webrtc.MAX_BLOCKS
    asyncio.run(out.close())
    assert not out.blocks and out.pc is None
    out.push(_block(1000, 4, 100))
    assert not out.blocks


@pytest.fixture(scope="module")
def served():
    model = load_model(checkpoint=None, preset_name=None, random_weights=False, device=torch.device("cpu"),
                       dtype=torch.float32, seed=0)
    with serve_in_thread(model, ServerConfig()) as url:
        yield url, model.cfg


class _Recorded(webrtc.RtcOutput):
    """RtcOutput that remembers itself and the server's event loop, for the checks after the session."""

    made: list[_Recorded] = []

    def __init__(self, session):
        super().__init__(session)
        self.loop = asyncio.get_running_loop()
        _Recorded.made.append(self)


def _best_lag(part: np.ndarray, whole: np.ndarray) -> tuple[int, float]:
    """(the sample of `whole` where `part` fits best, the normalised correlation there)."""
    n = len(part) + len(whole)
    corr = np.fft.irfft(np.fft.rfft(whole, n) * np.conj(np.fft.rfft(part, n)), n)
    lag = int(corr.argmax())
    window = np.sqrt(np.convolve(whole.astype(np.float64) ** 2, np.ones(len(part)), "full")[len(part) - 1:])
    score = corr[lag] / (np.linalg.norm(part) * max(window[lag % len(window)], 1e-9))
    return (lag - n if lag > n // 2 else lag), float(score)


def _check_sender_sync(out: webrtc.RtcOutput, fps: int, seconds: float) -> np.ndarray:
    """Each audio chunk went out when the video showed its timeline position (within a frame); the skews."""
    video = np.array([(w, t) for k, w, _, t in out.trace if k == "video"])
    audio = np.array([(w, t) for k, w, _, t in out.trace if k == "audio"])
    assert len(video) >= seconds * fps and len(audio) >= seconds / webrtc.AUDIO_CHUNK_S
    assert out.counts["resyncs"] == 0, out.counts  # audio never drifted from the clock (nor skipped speech)
    assert (np.diff(video[:, 1]) > 0).all()  # new frames go out in timeline order
    shown = np.searchsorted(video[:, 1], audio[:, 1], side="right") - 1  # the frame on screen at the chunk's start
    # Compared only with the frame that shows the chunk's moment: when the event loop is held up (two
    # busy cores), the video track skips to the newest frame and the skipped frames have no send time.
    own = np.floor(audio[:, 1] * fps + 1e-6)
    keep = (shown >= 0) & (np.round(video[np.maximum(shown, 0), 1] * fps) == own)
    assert keep.mean() > 0.8, keep.mean()  # nearly every chunk is compared
    skew = audio[keep, 0] - (video[shown[keep], 0] + audio[keep, 1] - video[shown[keep], 1])
    assert np.quantile(np.abs(skew), 0.95) < 1 / fps and np.abs(skew).max() < 3 / fps, np.quantile(skew, [0, 0.5, 1])
    return skew


async def _rtc_tasks() -> list[str]:
    """aiortc's and aioice's tasks on the running loop (the server's)."""
    files = [(t, getattr(getattr(t.get_coro(), "cr_code", None), "co_filename", "")) for t in asyncio.all_tasks()]
    return [repr(t) for t, f in files if "aiortc" in f or "aioice" in f]


async def _session(url: str, speech: np.ndarray) -> dict:
    """Start (raw frames over the WebSocket too), a bad offer, a real one, one spoken turn; what came back."""
    got: dict = {"video": [], "audio": [], "events": [], "raw": {}, "raw_audio": {}}
    async with connect(url.replace("http://", "ws://") + "/v1/ws", max_size=2**26) as ws:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        pulls = []

        async def pull(track, sink):
            while True:
                frame = await track.recv()
                sink.append((time.monotonic(), frame))

        pc.on("track", lambda t: pulls.append(asyncio.ensure_future(pull(t, got[t.kind]))))

        async def receive():
            async for m in ws:
                if isinstance(m, str):
                    e = json.loads(m)
                    got["events"].append(e)
                    if e["type"] == "webrtc_answer":
                        await pc.setRemoteDescription(RTCSessionDescription(e["sdp"], e["sdp_type"]))
                else:
                    kind, index, payload = unpack_media(m)
                    if kind == VIDEO_RAW:
                        got["raw"][index] = np.frombuffer(payload, np.uint8).reshape(96, 96, 3)
                    elif kind == AUDIO_PCM16:
                        got["raw_audio"][index] = from_pcm16(payload)

        async def wait(cond, timeout=45.0):
            deadline = time.monotonic() + timeout
            while not cond():
                assert time.monotonic() < deadline, f"timed out; events {[e['type'] for e in got['events']]}"
                await asyncio.sleep(0.02)

        receiver = asyncio.ensure_future(receive())
        await ws.send(json.dumps({"type": "start", "image": base64.b64encode(FACE).decode(), "video": "raw"}))
        await ws.send(json.dumps({"type": "webrtc_offer", "sdp": "v=0 nonsense", "sdp_type": "offer"}))
        await wait(lambda: any(e["type"] == "error" for e in got["events"]))
        await pc.setLocalDescription(await pc.createOffer())
        await ws.send(json.dumps({"type": "webrtc_offer", "sdp": pc.localDescription.sdp, "sdp_type": "offer"}))
        await wait(lambda: len(got["video"]) >= 8)
        for i in range(0, len(speech), 1600):
            await ws.send(to_pcm16(speech[i: i + 1600]))
        await ws.send(json.dumps({"type": "end_turn"}))
        await wait(lambda: any(e["type"] == "turn_ended" for e in got["events"]))
        await asyncio.sleep(1.0)
        got["connection"] = pc.connectionState
        out = _Recorded.made[-1]
        got["tasks_live"] = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_rtc_tasks(), out.loop))
        await ws.close()
        receiver.cancel()
        await wait(lambda: out.closed, timeout=10)
        await asyncio.sleep(0.2)
        got["closed"] = out.closed
        got["tasks_left"] = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_rtc_tasks(), out.loop))
        await pc.close()
        for p in pulls:
            p.cancel()
    return got


def test_loopback_frames_speech_and_sync(served, monkeypatch):
    url, cfg = served
    monkeypatch.setattr(webrtc, "RtcOutput", _Recorded)
    _Recorded.made.clear()
    speech = load_audio(ROOT / "examples" / "speech.wav")[: 3 * cfg.audio.sample_rate]
    got = asyncio.run(_session(url, speech))

    errors = [e for e in got["events"] if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["bad_sdp"]  # the bad offer was refused; the session carried on
    assert got["connection"] == "connected"
    assert len(_Recorded.made) == 1
    out = _Recorded.made[0]
    fps, rate = cfg.fps, cfg.audio.sample_rate

    # video: each received frame is one the session made (VP8 is lossy), in order, one frame interval apart
    raw0, raw = min(got["raw"]), np.stack([got["raw"][i] for i in sorted(got["raw"])]).astype(np.int16)
    video = np.stack([f.to_ndarray(format="rgb24") for _, f in got["video"]]).astype(np.int16)
    assert len(video) >= 4 * fps
    diff = np.abs(video[:, None] - raw[None]).mean(axis=(2, 3, 4))
    index, best = diff.argmin(1) + raw0, diff.min(1)
    assert np.median(best) < 8 and best.max() < 20, best
    assert (np.diff(index) >= -1).all() and index[-1] - index[0] >= 3 * fps  # near-identical idle frames may swap
    pts = np.array([f.pts for _, f in got["video"]])
    assert np.median(np.diff(pts)) == pytest.approx(90000 / fps, abs=2)

    # audio: the received speech is the timeline's (Opus at 48 kHz stereo -> 16 kHz mono)
    heard = np.concatenate([f.to_ndarray().reshape(-1, 2).mean(1) for _, f in got["audio"]])[::3] / 32768
    end = max(i + len(a) for i, a in got["raw_audio"].items())
    timeline = np.zeros(end, np.float32)
    for i, a in got["raw_audio"].items():
        timeline[i: i + len(a)] = a
    lag, whole = _best_lag(heard, timeline)  # timeline sample of the first sample heard
    # a stall inserts silence and shifts what follows, so the content is compared second by second,
    # each second at its own best lag
    seconds = [heard[i: i + rate] for i in range(0, len(heard) - rate + 1, rate)]
    scores = [_best_lag(seg, timeline)[1] for seg in seconds if np.abs(seg).max() > 0.05]
    assert len(scores) >= 2 and np.median(scores) > 0.8, (scores, whole, out.counts)

    _check_sender_sync(out, fps, seconds=4)

    # sync at the receiver: arrival time minus timeline time; aiortc's receiver adds about a frame of
    # video (a frame is complete when the next one starts) and its audio jitter buffer's prefetch
    late_v = np.array([t for t, _ in got["video"]]) - index / fps
    chunks = np.array([t for t, _ in got["audio"]])
    late_a = chunks - (np.arange(len(chunks)) * 320 + lag) / rate  # 960 samples at 48 kHz = 320 at 16 kHz
    assert abs(np.median(late_v) - np.median(late_a)) < 2 / fps, (np.median(late_v), np.median(late_a))

    # closing the WebSocket closed the server's peer connection (while the client's was still open)
    assert got["tasks_live"], "no aiortc task seen on the server loop during the session"
    assert got["closed"] and out.pc is None and not out.blocks
    assert got["tasks_left"] == []


def test_loopback_stalls_keep_sync(served, monkeypatch):
    """Blocks made slower than real time: the clock stalls, video repeats its last frame, audio sends
    silence, and what is sent stays in sync and equal to the made frames."""
    url, cfg = served
    made_block = AvatarSession.next_block

    def slow_block(self, *args, **kwargs):
        out = made_block(self, *args, **kwargs)
        time.sleep(0.6)
        return out

    monkeypatch.setattr(AvatarSession, "next_block", slow_block)
    monkeypatch.setattr(webrtc, "RtcOutput", _Recorded)
    _Recorded.made.clear()
    got = asyncio.run(_session(url, load_audio(ROOT / "examples" / "speech.wav")[: 2 * cfg.audio.sample_rate]))
    out = _Recorded.made[0]
    assert out.session.stall > 0.3, out.session.stall
    assert out.counts["repeats"] > 0 and out.counts["silent"] > 0, out.counts
    _check_sender_sync(out, cfg.fps, seconds=2)
    raw = np.stack([got["raw"][i] for i in sorted(got["raw"])]).astype(np.int16)
    video = np.stack([f.to_ndarray(format="rgb24") for _, f in got["video"]]).astype(np.int16)
    best = np.abs(video[:, None] - raw[None]).mean(axis=(2, 3, 4)).min(1)
    assert np.median(best) < 8 and best.max() < 20, best
    assert got["tasks_left"] == []
