"""One WebSocket connection: its messages in order, its session, and what is sent back.

The engine thread hands events and made blocks over with `call_soon_threadsafe`; a sender task
writes them out. Media waiting for a slow client is bounded (`MAX_BACKLOG` blocks): beyond it
blocks are dropped for that client and counted in `stats`, so a stalled client costs neither
memory nor other sessions' time. Every refused message gets one `error` line and the session
carries on.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from starlette.websockets import WebSocket, WebSocketDisconnect

from livetalk_cli.errors import UserError
from livetalk_cli.media import decode_audio, decode_image
from livetalk_cli.serve.live import LiveSession, MediaBlock
from livetalk_cli.serve.protocol import (
    AUDIO_PCM16,
    PROTOCOL_VERSION,
    VIDEO_JPEG,
    VIDEO_RAW,
    ProtocolError,
    b64decode,
    error_message,
    from_pcm16,
    pack_media,
    parse_text,
    to_pcm16,
)
from livetalk_cli.serve.responders import ResponderError

if TYPE_CHECKING:
    from livetalk_cli.serve.app import Server

log = logging.getLogger(__name__)
MAX_BACKLOG = 3  # made blocks waiting for one client before its blocks are dropped
STATE_EVERY_S, STATS_EVERY = 0.1, 10  # state checked every 0.1 s, stats sent every 10th check


class Connection:
    def __init__(self, ws: WebSocket, server: Server):
        self.ws, self.server = ws, server
        self.limits = server.config.limits
        self.loop = asyncio.get_running_loop()
        self.out: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.backlog = 0
        self.dropped_frames = 0
        self.session: LiveSession | None = None
        self.video = "jpeg"
        self.jpeg_quality = 85
        self.rtc: Any = None  # serve.webrtc.RtcOutput once the client negotiated WebRTC
        self.closing = False

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._send_loop()), asyncio.create_task(self._state_loop())]
        try:
            while not self.closing:
                try:
                    msg = await asyncio.wait_for(self.ws.receive(), timeout=self.limits.idle_timeout_s)
                except TimeoutError:
                    self.send_error("idle_timeout", f"no message for {self.limits.idle_timeout_s:.0f} s; closing")
                    break
                if msg["type"] == "websocket.disconnect":
                    break
                try:
                    if msg.get("bytes") is not None:
                        self._on_pcm(msg["bytes"])
                    elif msg.get("text") is not None:
                        await self._on_text(msg["text"])
                except ProtocolError as e:
                    self.send_error(e.code, str(e))
                except UserError as e:  # bad media in a message
                    self.send_error("bad_media", str(e))
        except WebSocketDisconnect:
            pass
        finally:
            self.closing = True
            if self.session is not None:
                self.server.engine.remove(self.session)
                self.server.release(self)
            if self.rtc is not None:
                await self.rtc.close()
            await self.out.put(("end", None))
            await asyncio.wait(tasks, timeout=2.0)
            for t in tasks:
                t.cancel()

    # ---------------------------------------------------------------- incoming

    async def _on_text(self, text: str) -> None:
        msg = parse_text(text, self.limits)
        kind = msg["type"]
        if kind == "start":
            await self._start(msg)
            return
        if kind == "close":
            self.out.put_nowait(("text", json.dumps({"type": "closed"})))
            self.closing = True
            return
        session = self._session()
        if kind == "audio":
            data = b64decode(msg.get("data", ""), "audio.data")
            if msg.get("format", "pcm16") == "pcm16":
                self._on_pcm(data)
            else:
                rate = session.rate
                samples = await self._off_loop(decode_audio, data, rate)
                self._check_turn_length(len(samples))
                session.add_audio(samples)
                self.server.engine.wake()
        elif kind == "end_turn":
            job = session.end_turn()
            self.server.engine.wake()
            if job is not None:
                asyncio.create_task(self._respond(session, *job))
        elif kind == "interrupt":
            session.interrupt()
        elif kind == "prompt":
            session.request_prompt(msg["prompt"])
        elif kind == "webrtc_offer":
            from livetalk_cli.serve.webrtc import RtcOutput

            if self.rtc is None:
                self.rtc = RtcOutput(session)
            answer = await self.rtc.answer(msg["sdp"], msg.get("sdp_type", "offer"))
            self.out.put_nowait(("text", json.dumps({"type": "webrtc_answer", **answer})))

    def _on_pcm(self, data: bytes) -> None:
        session = self._session()
        if len(data) % 2:
            raise ProtocolError("bad_audio", "PCM16 audio needs an even number of bytes")
        samples = from_pcm16(data)
        self._check_turn_length(len(samples))
        session.add_audio(samples)
        self.server.engine.wake()

    def _check_turn_length(self, n: int) -> None:
        if n > self.limits.max_turn_s * self.server.model.cfg.audio.sample_rate:
            raise ProtocolError("turn_too_long", f"one audio message holds at most {self.limits.max_turn_s:.0f} s")

    def _session(self) -> LiveSession:
        if self.session is None:
            raise ProtocolError("no_session", "send start first")
        return self.session

    async def _start(self, msg: dict[str, Any]) -> None:
        if self.session is not None:
            raise ProtocolError("already_started", "this connection has a session; open another connection")
        if "image" not in msg:
            raise ProtocolError("bad_field", "start needs image (base64 of an image file)")
        cfg = self.server.model.cfg
        data = b64decode(msg["image"], "start.image")
        image = await self._off_loop(decode_image, data, cfg.height, cfg.width, msg.get("fit", "crop"),
                                     self.limits.max_image_pixels)
        sid = uuid.uuid4().hex[:12]
        self.server.admit(self)  # raises busy
        self.video = msg.get("video", "jpeg")
        self.jpeg_quality = msg.get("jpeg_quality", 85)
        session = LiveSession(sid, self.server.model, self.server.config.responder, self.limits, emit=self._emit,
                              pacing=self.server.config.pacing, threads=self.server.config.threads)
        session.request_start(image, msg.get("prompt", ""), msg.get("seed", 0))
        self.session = session
        self.server.engine.add(session)

    async def _respond(self, session: LiveSession, turn: int, generation: int, audio: np.ndarray) -> None:
        responder = self.server.config.responder
        try:
            reply = await self._off_loop(responder.reply, audio, self.limits.responder_timeout_s)
        except ResponderError as e:
            self.send_error("responder", str(e))
            reply = None
        session.add_reply(turn, generation, reply)
        self.server.engine.wake()

    def _off_loop(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        """Decoding, encoding and responders run on the server's bounded I/O pool, off the event loop."""
        return self.loop.run_in_executor(self.server.io_pool, fn, *args)

    # ---------------------------------------------------------------- outgoing

    def _emit(self, kind: str, payload: Any) -> None:
        """Called from the engine thread."""
        self.loop.call_soon_threadsafe(self._on_emit, kind, payload)

    def _on_emit(self, kind: str, payload: Any) -> None:
        if kind == "event":
            if payload["type"] == "started":
                cfg = self.server.model.cfg
                payload = {**payload, "protocol": PROTOCOL_VERSION, "fps": cfg.fps, "width": cfg.width,
                           "height": cfg.height, "sample_rate": cfg.audio.sample_rate}
            self.out.put_nowait(("text", json.dumps(payload)))
        elif kind == "media":
            if self.rtc is not None:
                self.rtc.push(payload)
            if self.video == "none":
                return
            if self.backlog >= MAX_BACKLOG:
                self.dropped_frames += len(payload.frames)
                return
            self.backlog += 1
            self.out.put_nowait(("media", payload))
        elif kind == "close":
            self.closing = True
            self.out.put_nowait(("end", None))

    def send_error(self, code: str, message: str) -> None:
        self.out.put_nowait(("text", error_message(code, message)))

    async def _send_loop(self) -> None:
        try:
            while True:
                kind, item = await self.out.get()
                if kind == "end":
                    return
                if kind == "text":
                    await self.ws.send_text(item)
                    continue
                for packet in await self._off_loop(self._packets, item):
                    await self.ws.send_bytes(packet)
                self.backlog -= 1
        except (WebSocketDisconnect, RuntimeError, OSError):  # the client went away
            self.closing = True

    def _packets(self, block: MediaBlock) -> list[bytes]:
        out = []
        for i, frame in enumerate(block.frames):
            if self.video == "raw":
                out.append(pack_media(VIDEO_RAW, block.frame0 + i, frame.tobytes()))
            else:
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, format="JPEG", quality=self.jpeg_quality)
                out.append(pack_media(VIDEO_JPEG, block.frame0 + i, buf.getvalue()))
        spf = len(block.audio) // len(block.frames)  # samples per frame
        out.append(pack_media(AUDIO_PCM16, block.frame0 * spf, to_pcm16(block.audio)))
        return out

    async def _state_loop(self) -> None:
        tick, last = 0, ""
        while not self.closing:
            await asyncio.sleep(STATE_EVERY_S)
            s = self.session
            if s is None or not s.avatar.started:
                continue
            tick += 1
            state = s.state()
            if state != last:
                last = state
                self.out.put_nowait(("text", json.dumps({"type": "state", "state": state})))
            if tick % STATS_EVERY == 0:
                stats = s.stats_message(s.clock())
                stats.update(dropped_frames=self.dropped_frames, sessions=self.server.active(),
                             engine_load=round(self.server.engine.load(), 3))
                self.out.put_nowait(("text", json.dumps(stats)))
