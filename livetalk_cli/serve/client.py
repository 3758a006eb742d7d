"""A Python client of the serve-local WebSocket API (v1), used by the tests and `livetalk bench --serve`.

    with AvatarClient.connect("http://127.0.0.1:8765", token=None) as c:
        c.start(Path("face.png").read_bytes(), prompt="a person talking", video="raw")
        c.send_pcm(samples)            # float32 16 kHz mono, sent as PCM16 chunks
        c.end_turn()
        c.wait_event("turn_ended")
        frames = c.frames               # {frame index: (H, W, 3) uint8}, arrival times in c.frame_times

A receiver thread collects everything the server sends with its arrival time (`time.monotonic`).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from livetalk_cli.serve.protocol import AUDIO_PCM16, VIDEO_JPEG, VIDEO_RAW, from_pcm16, to_pcm16, unpack_media


class AvatarClient:
    """`decode=False` keeps JPEG frames as bytes; `keep=N` keeps only the newest N frames and audio
    packets (a long session), while `received` counts every frame."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.decode, self.keep = True, None
        self.received = 0
        self.frames: dict[int, Any] = {}
        self.frame_times: dict[int, float] = {}
        self.audio: dict[int, np.ndarray] = {}  # first sample -> float32 samples
        self.info: dict[str, Any] = {}
        self.closed = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._receive, name="livetalk-client", daemon=True)
        self._thread.start()

    @classmethod
    @contextmanager
    def connect(cls, base_url: str, token: str | None = None, *, open_timeout: float = 10.0) -> Iterator[AvatarClient]:
        url = base_url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + "/v1/ws"
        headers = {"Authorization": f"Bearer {token}"} if token else None
        with connect(url, additional_headers=headers, open_timeout=open_timeout, max_size=64 * 2**20) as ws:
            client = cls(ws)
            try:
                yield client
            finally:
                ws.close()
                client._thread.join(timeout=5)

    # ------------------------------------------------------------------ requests

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message))

    def start(self, image: bytes, prompt: str = "", *, seed: int = 0, video: str = "jpeg", fit: str = "crop",
              timeout: float = 60.0, decode: bool = True, keep: int | None = None) -> dict[str, Any]:
        self.decode, self.keep = decode, keep
        after = len(self.events)  # errors of earlier messages are not this start's
        self.send({"type": "start", "image": base64.b64encode(image).decode(), "prompt": prompt, "seed": seed,
                   "video": video, "fit": fit})
        self.info = self.wait_event("started", timeout=timeout, after=after)
        return self.info

    def send_pcm(self, samples: np.ndarray, chunk_s: float = 0.1, realtime: bool = False) -> None:
        """float32 samples in [-1, 1] -> PCM16 binary messages of `chunk_s`; `realtime` paces them."""
        rate = self.info.get("sample_rate", 16000)
        step = max(1, int(chunk_s * rate))
        t0 = time.monotonic()
        for i in range(0, len(samples), step):
            if realtime:
                time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            self.ws.send(to_pcm16(samples[i: i + step]))

    def send_file(self, data: bytes) -> None:
        """An encoded audio file (anything PyAV decodes) as one turn's audio."""
        self.send({"type": "audio", "format": "file", "data": base64.b64encode(data).decode()})

    def end_turn(self) -> None:
        self.send({"type": "end_turn"})

    def interrupt(self) -> None:
        self.send({"type": "interrupt"})

    def prompt(self, text: str) -> None:
        self.send({"type": "prompt", "prompt": text})

    def close(self) -> None:
        self.send({"type": "close"})

    # ------------------------------------------------------------------ what came back

    def wait_event(self, kind: str, timeout: float = 30.0, after: int = 0, **match: Any) -> dict[str, Any]:
        """The first event of type `kind` (at index >= `after` in `events`) whose fields equal `match`;
        an `error` event raises when `kind` is not "error"."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, e in self.events[after:]:
                    if e["type"] == kind and all(e.get(k) == v for k, v in match.items()):
                        return e
                    if e["type"] == "error" and kind != "error":
                        raise RuntimeError(f"server error: {e.get('code')}: {e.get('message')}")
                left = deadline - time.monotonic()
                if left <= 0 or self.closed.is_set():
                    raise TimeoutError(f"no {kind!r} event within {timeout} s")
                self._cond.wait(left)

    def wait_frames(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.received < n:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed.is_set():
                    raise TimeoutError(f"{self.received} of {n} frames within {timeout} s")
                self._cond.wait(left)

    def timeline_audio(self) -> np.ndarray:
        """The avatar's audio received so far, placed at its sample indices (gaps are zeros)."""
        with self._cond:  # the receiver thread adds packets
            packets = list(self.audio.items())
        if not packets:
            return np.zeros(0, np.float32)
        end = max(i + len(a) for i, a in packets)
        out = np.zeros(end, np.float32)
        for i, a in packets:
            out[i: i + len(a)] = a
        return out

    def _media(self, kind: int, index: int, payload: bytes, now: float, h: int, w: int) -> None:
        if kind == AUDIO_PCM16:
            self.audio[index] = from_pcm16(payload)
            _trim(self.audio, self.keep)
            return
        if kind == VIDEO_RAW:
            frame: Any = np.frombuffer(payload, np.uint8).reshape(h, w, 3)
        elif kind == VIDEO_JPEG:
            frame = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")) if self.decode else payload
        else:
            return
        self.frames[index], self.frame_times[index] = frame, now
        self.received += 1
        _trim(self.frames, self.keep)
        _trim(self.frame_times, self.keep)

    def _receive(self) -> None:
        h, w = 0, 0
        try:
            for message in self.ws:
                now = time.monotonic()
                with self._cond:
                    if isinstance(message, str):
                        event = json.loads(message)
                        if event["type"] == "started":
                            h, w = event["height"], event["width"]
                        self.events.append((now, event))
                    else:
                        self._media(*unpack_media(message), now, h, w)
                    self._cond.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            with self._cond:
                self._cond.notify_all()


def _trim(d: dict[int, Any], keep: int | None) -> None:
    """Keep the newest `keep` entries (insertion order is arrival order)."""
    while keep is not None and len(d) > keep:
        del d[next(iter(d))]
