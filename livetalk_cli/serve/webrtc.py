"""WebRTC media output of one session (aiortc): a video and an audio track paced by the playout clock.

The connection pushes every made block (`push`, on the event loop); the tracks read from those blocks
at the session's playout clock (`LiveSession.position`), so audio and video present the same timeline
position at the same wall time:

- video: the newest made frame at or before the clock, sent when it is due; while the next frame is
  not made yet (a stall) the last one is repeated every frame interval.
- audio: 20 ms chunks on a fixed wall-clock schedule, read sequentially from the timeline audio and
  re-aligned to the clock when they drift apart by more than `RESYNC_S`; silence where no audio is
  made yet (before a block arrives, or during a stall).

Timestamps: both tracks stamp media with its wall presentation time relative to frame 0
(`t0 + stalls + index / fps`), i.e. the frame index over fps while nothing stalls. Opus takes its RTP
timestamps from the continuous chunk count and RTCP maps each track's RTP time to its send time, so
sending both on the same clock is what keeps them in sync at the browser.

Buffers are bounded: blocks that ended more than `KEEP_S` before the clock are dropped, and at most
`MAX_BLOCKS` are kept. No STUN/TURN servers are used (host candidates only).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections import deque

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from livetalk_cli.serve.live import LiveSession, MediaBlock
from livetalk_cli.serve.protocol import ProtocolError

log = logging.getLogger(__name__)
VIDEO_TIME_BASE = fractions.Fraction(1, 90000)
AUDIO_CHUNK_S = 0.02
RESYNC_S = 0.06  # audio further than this from the clock jumps to it
KEEP_S = 0.5  # blocks kept after they were presented (audio may lag the clock by up to RESYNC_S)
MAX_BLOCKS = 16  # a safety cap: the clock trim keeps about (lead + KEEP_S) of blocks
TRACE_LEN = 4096


class RtcOutput:
    """One WebRTC peer connection sending a session's frames and speech; renegotiating replaces it."""

    def __init__(self, session: LiveSession):
        self.session = session
        self.blocks: deque[MediaBlock] = deque()
        self.ready = asyncio.Event()  # set by the first pushed block
        self.pc: RTCPeerConnection | None = None
        self.closed = False
        # what was sent: (kind "video" | "audio", wall time, pts seconds, timeline seconds); diagnostics and tests
        self.trace: deque[tuple[str, float, float, float]] = deque(maxlen=TRACE_LEN)
        self.counts = {"video": 0, "repeats": 0, "audio": 0, "silent": 0, "resyncs": 0}

    async def answer(self, sdp: str, sdp_type: str) -> dict[str, str]:
        """Apply the browser's offer and return the answer, its ICE candidates gathered."""
        if self.closed:
            raise ProtocolError("closed", "the WebRTC output is closed")
        if sdp_type != "offer":
            raise ProtocolError("bad_field", "webrtc_offer.sdp_type must be 'offer'")
        if self.pc is not None:  # a new offer restarts the output
            old, self.pc = self.pc, None
            await old.close()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc = pc

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("webrtc session %s: %s", self.session.id, pc.connectionState)
            if pc.connectionState == "failed" and self.pc is pc:
                self.pc = None
                await pc.close()

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as e:  # aiortc raises ValueError and others on SDP it cannot use
            await self._drop(pc)
            raise ProtocolError("bad_sdp", f"unusable WebRTC offer: {e}") from None
        kinds = {t.kind for t in pc.getTransceivers()}
        if not kinds & {"audio", "video"}:
            await self._drop(pc)
            raise ProtocolError("bad_sdp", "the WebRTC offer has neither a video nor an audio section")
        if "video" in kinds:
            pc.addTrack(_VideoTrack(self))
        if "audio" in kinds:
            pc.addTrack(_AudioTrack(self))
        await pc.setLocalDescription(await pc.createAnswer())  # waits for ICE gathering
        local = pc.localDescription
        return {"sdp": local.sdp, "sdp_type": local.type}

    async def _drop(self, pc: RTCPeerConnection) -> None:
        if self.pc is pc:
            self.pc = None
        await pc.close()

    def push(self, block: MediaBlock) -> None:
        """A made block (event loop thread). Drops blocks presented more than KEEP_S ago."""
        if self.closed:
            return
        self.blocks.append(block)
        s = self.session
        horizon = (s.position() - KEEP_S) * s.fps
        while self.blocks and (self.blocks[0].frame0 + len(self.blocks[0].frames) < horizon
                               or len(self.blocks) > MAX_BLOCKS):
            self.blocks.popleft()
        self.ready.set()

    async def close(self) -> None:
        """Close the peer connection (its sender tasks end with it) and free the buffers."""
        self.closed = True
        pc, self.pc = self.pc, None
        if pc is not None:
            await pc.close()
        self.blocks.clear()

    # ------------------------------------------------------------------ what the tracks read

    def frame(self, upto: int, after: int) -> tuple[int, np.ndarray] | None:
        """The newest frame with after < index <= upto, or None."""
        for b in reversed(self.blocks):
            i = min(upto, b.frame0 + len(b.frames) - 1)
            if i >= b.frame0 and i > after:
                return i, b.frames[i - b.frame0]
            if b.frame0 <= after:
                return None
        return None

    def audio(self, start: int, n: int) -> tuple[np.ndarray, int]:
        """Timeline samples [start, start + n) (zeros where not made) and how many of the first are made."""
        out = np.zeros(n, np.float32)
        have = np.zeros(n, bool)
        spf = self.session.spf
        for b in self.blocks:
            b0 = b.frame0 * spf
            lo, hi = max(start, b0), min(start + n, b0 + len(b.audio))
            if lo < hi:
                out[lo - start: hi - start] = b.audio[lo - b0: hi - b0]
                have[lo - start: hi - start] = True
        missing = np.flatnonzero(~have)
        return out, int(missing[0]) if len(missing) else n


class _VideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, out: RtcOutput):
        super().__init__()
        self.out = out
        self.index = -1  # last frame sent
        self.last: np.ndarray | None = None
        self.last_wall = 0.0
        self.last_pts = -1

    async def recv(self) -> av.VideoFrame:
        out, s = self.out, self.out.session
        await out.ready.wait()
        assert s.t0 is not None
        interval = 1.0 / s.fps
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            now = time.monotonic()
            on_screen = int(s.position(now) * s.fps + 1e-6)
            found = out.frame(on_screen, self.index)
            if found is None and self.last is None:  # joined late: begin with the earliest frame kept
                found = next(((b.frame0, b.frames[0]) for b in out.blocks), None)
            if found is not None:
                self.index, self.last = found
                due = s.presentation_time(self.index)
                out.counts["video"] += 1
                return self._frame(max(due, self.last_wall), timeline=self.index / s.fps)
            if self.last is not None and now >= self.last_wall + interval:  # stalled: repeat the last frame
                out.counts["repeats"] += 1
                return self._frame(now, timeline=None)
            wake = s.presentation_time(on_screen + 1)
            if self.last is not None:
                wake = min(wake, self.last_wall + interval)
            await asyncio.sleep(min(max(wake - now, 0.002), interval))

    def _frame(self, wall: float, timeline: float | None) -> av.VideoFrame:
        s = self.out.session
        assert self.last is not None and s.t0 is not None
        self.last_wall = wall
        self.last_pts = max(round((wall - s.t0) * 90000), self.last_pts + 1)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(self.last), format="rgb24")
        frame.pts, frame.time_base = self.last_pts, VIDEO_TIME_BASE
        if timeline is not None:
            self.out.trace.append(("video", time.monotonic(), self.last_pts / 90000, timeline))
        return frame


class _AudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, out: RtcOutput):
        super().__init__()
        self.out = out
        self.tick: float | None = None  # wall time of the next chunk
        self.sample = 0  # timeline sample of the next chunk
        self.pts = 0

    async def recv(self) -> av.AudioFrame:
        out, s = self.out, self.out.session
        await out.ready.wait()
        assert s.t0 is not None
        n = round(AUDIO_CHUNK_S * s.rate)
        now = time.monotonic()
        if self.tick is None:
            self.tick = now
            self.pts = round((now - s.t0) * s.rate)
            self.sample = round(s.position(now) * s.rate)
        elif now - self.tick > 1.0:  # the loop was blocked for long: skip ahead rather than burst
            log.debug("webrtc audio %.2f s behind; skipping", now - self.tick)
            self.tick = now
        if self.tick > now:
            await asyncio.sleep(self.tick - now)
        if self.readyState != "live":
            raise MediaStreamError
        wall = time.monotonic()
        clock = round(s.position(self.tick) * s.rate)  # at the chunk's scheduled time: a late loop sends a burst
        if abs(clock - self.sample) > RESYNC_S * s.rate:
            out.counts["resyncs"] += 1
            self.sample = clock
        chunk, made = out.audio(self.sample, n)
        if made:
            out.counts["audio"] += 1
            out.trace.append(("audio", wall, self.pts / s.rate, self.sample / s.rate))
        else:
            out.counts["silent"] += 1
        self.sample += made
        pcm = (np.clip(chunk, -1.0, 1.0) * 32767.0).round().astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = s.rate
        frame.pts, frame.time_base = self.pts, fractions.Fraction(1, s.rate)
        self.pts += n
        self.tick += n / s.rate
        return frame

