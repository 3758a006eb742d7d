"""One client's live avatar: the runtime session (its KV cache is the avatar's visual memory) plus
the speech timeline, turns and the playout clock a server needs around it.

Timeline: one audio track, sample 0 = video frame 0, that only grows. The engine extends it just
before each block: with queued speech first, and with silence only when the block is due and no
speech is waiting (the avatar idles on silence between turns and never freezes). What the client
receives is exactly that timeline beside the frames made from it, so a session equals `render` of
the audio it played.

Playout clock: the timeline position being presented now. It runs with the wall clock from the
first frame and waits (a stall, counted in `stats`) when frames are late. Blocks are made at most
`Pacing.lead_s` ahead of it while speaking and `idle_lead_s` while idle, which bounds memory, keeps a
new turn's latency low and makes an interruption take effect within about a block.

Threads: the client's side (`add_audio`, `end_turn`, `interrupt`, `request_prompt`) runs on the
event loop; `plan` and `work` run on the engine thread only; `self.lock` guards what both touch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from livetalk_cli.pipeline import LoadedModel
from livetalk_cli.runtime.session import AvatarSession
from livetalk_cli.runtime.stream import StreamOptions
from livetalk_cli.serve.protocol import Limits, ProtocolError
from livetalk_cli.serve.responders import Responder


@dataclass
class MediaBlock:
    """A made block: frames [frame0, frame0 + T) and the timeline's audio of exactly those frames."""

    frame0: int
    frames: np.ndarray  # (T, H, W, 3) uint8
    audio: np.ndarray  # (T * samples_per_frame,) float32 in [-1, 1]


@dataclass
class _Turn:
    id: int
    start: int | None = None  # timeline sample of its first speech
    end: int | None = None  # timeline sample one past its last speech (once all of it is placed)
    started_sent: bool = False
    interrupted: bool = False
    lead_s: float | None = None  # the idle lead its first block was made with (a streamed turn keeps it)


@dataclass
class Pacing:
    """How far ahead of the playout clock blocks are made. Blocks are made just in time (the idle
    lead covers a block's making, other sessions' included: see `LiveSession.plan`), so a turn's
    speech lands soon after it arrives and an interruption cuts speech after the block being made.
    The block holding a turn's first speech may be made further ahead (`lead_s`; None: idle lead +
    one block's duration), so it never waits for the clock.

    A turn still arriving (a microphone) is placed so that its audio keeps up: its first sample
    plays a block's audio window plus the idle lead plus one chunk after it arrived (audio comes in
    real time and every later block of the turn is made the idle lead ahead), with silence before
    it in its first block. An earlier start would run out of speech mid-turn and the timeline would
    get silence inside the turn; later blocks of a streamed turn short of audio wait for it up to
    the lead the turn started with."""

    lead_s: float | None = None
    idle_lead_s: float = 0.4


@dataclass
class _Stats:
    frames: int = 0
    block_s: deque[float] = field(default_factory=lambda: deque(maxlen=6))  # the last blocks' making times
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))  # (wall, frames)
    stalls: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=16))  # (wall, stall) per stats


    @property
    def last_block_s(self) -> float:
        return self.block_s[-1] if self.block_s else 0.0

    @property
    def block_cost_s(self) -> float:
        """What making one block takes: the mean of the last few. Some blocks cost more than the rest
        (the demo decoder's anchor every third block); the lead follows the mean rather than swinging
        with each one (a streamed turn keeps the lead it started with: see `Pacing`)."""
        return sum(self.block_s) / len(self.block_s) if self.block_s else 0.0


REALTIME_WINDOW_S, REALTIME_STALL = 5.0, 0.02  # real time: the player stalled < 2 % of the last 5 s


class LiveSession:
    def __init__(self, sid: str, model: LoadedModel, responder: Responder, limits: Limits, *,
                 emit: Callable[[str, Any], None], pacing: Pacing | None = None, threads: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.id, self.model, self.responder, self.limits = sid, model, responder, limits
        self.emit = emit  # (kind, payload): "event" with a dict, "media" with a MediaBlock; thread-safe
        self.pacing = pacing or Pacing()
        self.clock = clock
        self.cfg = model.cfg
        self.fps, self.rate = self.cfg.fps, self.cfg.audio.sample_rate
        self.avatar = AvatarSession(model, options=StreamOptions(pipelined=False, threads=threads),
                                    buffer_s=30.0)
        self.spf = self.avatar.stream.spf
        block_s = self.cfg.stream.block_frames * self.cfg.vae.temporal_factor / self.fps
        self.block_s = block_s
        self.lock = threading.Lock()
        self.closed = False
        self.speech: deque[tuple[int, np.ndarray | None]] = deque()  # (turn, samples | None = turn ends)
        self.pending = 0  # speech samples queued
        self.user_audio: list[np.ndarray] = []  # the open turn's audio (non-streaming responders)
        self.user_samples = 0
        self.open_turn: _Turn | None = None
        self.turns: deque[_Turn] = deque()  # turns placed on the timeline, not yet ended
        self.next_turn = 1
        self.thinking = 0  # responders running
        self.generation = 0  # bumped by interrupt: replies of older turns are dropped
        self._start: tuple[torch.Tensor, str, int] | None = None
        self._prompt: str | None = None
        self._interrupt = False
        self._idle_s = self.pacing.idle_lead_s  # the idle lead of the last plan (work places speech by it)
        self.t0: float | None = None  # wall time of frame 0's presentation
        self.stall = 0.0
        self._clock_lock = threading.Lock()
        self.stats = _Stats()

    # ------------------------------------------------------------------ client side (event loop)

    def request_start(self, image: torch.Tensor, prompt: str, seed: int) -> None:
        with self.lock:
            self._start = (image, prompt, seed)

    def request_prompt(self, prompt: str) -> None:
        """The prompt of the blocks made from now on; identity and cache carry on."""
        with self.lock:
            self._prompt = prompt

    def add_audio(self, samples: np.ndarray) -> None:
        """User audio (float32 16 kHz mono). Echo: spoken as it arrives; else kept for the responder."""
        with self.lock:
            if self.open_turn is None:
                self.open_turn = _Turn(self.next_turn)
                self.next_turn += 1
            if self.responder.streaming:
                if (self.pending + len(samples)) / self.rate > self.limits.max_pending_s:
                    raise ProtocolError("too_much_audio", f"over {self.limits.max_pending_s:.0f} s of speech "
                                        "waiting to be rendered; audio dropped")
                self.speech.append((self.open_turn.id, samples))
                self.pending += len(samples)
            else:
                if (self.user_samples + len(samples)) / self.rate > self.limits.max_turn_s:
                    raise ProtocolError("turn_too_long", f"a turn is at most {self.limits.max_turn_s:.0f} s; "
                                        "audio dropped (send end_turn)")
                self.user_audio.append(samples)
                self.user_samples += len(samples)

    def end_turn(self) -> tuple[int, int, np.ndarray] | None:
        """Close the open turn. Non-streaming responders: (turn, generation, the user's audio) for
        `add_reply` once the responder has answered; echo: None."""
        with self.lock:
            turn, self.open_turn = self.open_turn, None
            if turn is None:
                raise ProtocolError("no_turn", "end_turn without audio since the last turn")
            if self.responder.streaming:
                self.speech.append((turn.id, None))
                return None
            audio = np.concatenate(self.user_audio) if self.user_audio else np.zeros(0, np.float32)
            self.user_audio, self.user_samples = [], 0
            self.thinking += 1
            return turn.id, self.generation, audio

    def add_reply(self, turn: int, generation: int, audio: np.ndarray | None) -> None:
        """A responder's answer (None: it failed) to speak as turn `turn`."""
        with self.lock:
            self.thinking -= 1
            if audio is None or generation != self.generation or not len(audio):
                return
            audio = audio[: int(self.limits.max_turn_s * self.rate)]
            self.speech.extend([(turn, audio), (turn, None)])
            self.pending += len(audio)

    def interrupt(self) -> None:
        """Barge-in: queued speech and the open turn are dropped; the engine silences what is not
        rendered yet before its next block."""
        with self.lock:
            self.speech.clear()
            self.pending = 0
            self.user_audio, self.user_samples = [], 0
            self.open_turn = None
            self.generation += 1
            self._interrupt = True

    def state(self) -> str:
        """idle | listening (the user's turn is open) | thinking (a responder runs) | speaking."""
        with self.lock:
            if self.turns or self.pending or (self.open_turn is not None and self.responder.streaming):
                return "speaking"
            if self.thinking:
                return "thinking"
            return "listening" if self.open_turn is not None else "idle"

    # ------------------------------------------------------------------ playout clock

    def position(self, now: float | None = None) -> float:
        """Timeline seconds presented now: wall time since frame 0, less the stalls (the player
        waits when the next frame is not made yet)."""
        if self.t0 is None:
            return 0.0
        now = self.clock() if now is None else now
        with self._clock_lock:
            raw, made = now - self.t0 - self.stall, self.stats.frames / self.fps
            if raw > made:
                self.stall += raw - made
                raw = made
            return raw

    def presentation_time(self, frame: int) -> float:
        """Wall time at which `frame` is due (so far: later if stalls come first)."""
        self.position()
        assert self.t0 is not None
        return self.t0 + self.stall + frame / self.fps

    # ------------------------------------------------------------------ engine side

    def plan(self, now: float, backlog_s: float = 0.0) -> tuple[float, float] | None:
        """(earliest wall time to run `work`, deadline for earliest-deadline-first), or None.
        `backlog_s`: what making one block of every session takes now (the engine's sum): the idle
        lead grows to 1.5x that, so a due block is made in time however many sessions wait."""
        if self.closed:
            return None
        with self.lock:
            if self._start is not None:
                return now, now
            if not self.avatar.started:
                return None
        if self.t0 is None:
            return now, now
        due = self.presentation_time(self.avatar.frames_done)
        idle = self._idle_s = max(self.pacing.idle_lead_s, 1.5 * backlog_s)
        with self.lock:
            need = self.avatar.window_end() - self.avatar.buffer.end
            if self.pending > 0 and not self.turns and self._head_turn()[2]:
                # the next block holds the first speech of a turn queued whole: it may go further ahead
                lead = self.pacing.lead_s if self.pacing.lead_s is not None else idle + self.block_s
                return due - lead, due
            last = self.turns[-1] if self.turns else None
            if last is not None and last.lead_s is not None and last.end is None and self.pending < need:
                # a streamed turn short of audio waits for it as long as the lead it started with allows
                return due - min(idle, last.lead_s), due
        return due - idle, due

    def _head_turn(self) -> tuple[int, int, bool]:
        """The queue's first turn: (samples queued, its longest chunk, whether all of it is queued).
        With `self.lock` held."""
        head, queued, chunk = self.speech[0][0], 0, 0
        for turn_id, samples in self.speech:
            if turn_id != head:
                break
            if samples is None:
                return queued, chunk, True
            queued, chunk = queued + len(samples), max(chunk, len(samples))
        return queued, chunk, False

    def _turn_offset(self, now: float, need: int, idle: float) -> int | None:
        """Where the queue's first turn starts in the next block (`need` new samples): the samples of
        silence before it, or None if it cannot start there. All of it queued: at once (0). Still
        arriving: when its first sample arrived (taken as now less what is queued: audio comes in
        real time) plus a block's audio window (frames and look-ahead), the idle lead and one of its
        chunks (arrival jitter), so each later block of the turn finds its audio arrived when it is
        made (see `Pacing`); None if that is past this block or the block would need audio not
        arrived yet. With `self.lock` held."""
        if not self.speech:
            return None
        queued, chunk, complete = self._head_turn()
        if complete:
            return 0
        span = self.avatar.window_end() - self.avatar.frames_done * self.spf  # a block's frames + look-ahead
        at = now + (span + chunk - queued) / self.rate + idle  # when its first sample should play
        offset = max(0, round((at - self.presentation_time(0)) * self.rate) - self.avatar.buffer.end)
        return offset if offset < need and need - offset <= queued else None

    def work(self) -> None:
        """One unit of engine work: start, or the next block (prompt, interruption and timeline first)."""
        with self.lock:
            start, self._start = self._start, None
            prompt, self._prompt = self._prompt, None
            interrupted, self._interrupt = self._interrupt, False
        if start is not None:
            image, text, seed = start
            self.avatar.start(image, text, seed)
            self.emit("event", {"type": "started", "session": self.id})
            return
        if prompt is not None:
            self.avatar.set_prompt(prompt)
            self.emit("event", {"type": "prompt_set", "frame": self.avatar.frames_done})
        if interrupted:
            self._cut_turns()
        self._extend_timeline()
        t = time.perf_counter()
        frame0 = self.avatar.frames_done
        frames, audio = self.avatar.next_block()
        st = self.stats
        st.block_s.append(time.perf_counter() - t)
        st.frames += len(frames)
        now = self.clock()
        if self.t0 is None:
            self.t0 = now
        st.recent.append((now, st.frames))
        self.emit("media", MediaBlock(frame0, frames, audio))
        self._turn_events(frame0 + len(frames))

    def _extend_timeline(self) -> None:
        """Queued speech up to the next block's window end (a new turn only once it may start: see
        `Pacing`), the rest silence (the block is due)."""
        need = self.avatar.window_end() - self.avatar.buffer.end
        with self.lock:
            speak = need
            if self.speech and not self.turns and self.t0 is not None:
                offset = self._turn_offset(self.clock(), need, self._idle_s)
                if offset is None:
                    speak = 0  # the next turn starts in a later block
                else:
                    if offset:
                        self.avatar.buffer.push(np.zeros(offset, np.float32))
                    need = speak = need - offset
                    if not self._head_turn()[2]:
                        self._turn(self.speech[0][0]).lead_s = self._idle_s  # streamed: keeps this lead
            while speak > 0 and self.speech:
                turn_id, samples = self.speech[0]
                turn = self._turn(turn_id)
                if samples is None:  # the turn's last sample is placed
                    turn.end = self.avatar.buffer.end
                    self.speech.popleft()
                    continue
                if turn.start is None:
                    turn.start = self.avatar.buffer.end
                take = samples[:speak]
                self.avatar.buffer.push(take)
                speak -= len(take)
                need -= len(take)
                self.pending -= len(take)
                if len(take) == len(samples):
                    self.speech.popleft()
                else:
                    self.speech[0] = (turn_id, samples[len(take):])
            while self.speech and self.speech[0][1] is None:  # an end marker right at the window's end
                self._turn(self.speech.popleft()[0]).end = self.avatar.buffer.end
        if need > 0:
            self.avatar.buffer.push(np.zeros(need, np.float32))

    def _turn(self, turn_id: int) -> _Turn:
        for t in self.turns:
            if t.id == turn_id:
                return t
        turn = _Turn(turn_id)
        self.turns.append(turn)
        return turn

    def _cut_turns(self) -> None:
        """An interruption: silence the audio not rendered yet; placed turns end where frames end."""
        self.avatar.silence_unrendered()
        cut = self.avatar.frames_done * self.spf
        for t in self.turns:
            t.interrupted = True
            if t.start is not None and t.start >= cut:
                t.start = None  # nothing of it is heard
            t.end = cut if t.end is None or t.end > cut else t.end
        self.emit("event", {"type": "interrupted", "frame": self.avatar.frames_done})

    def _turn_events(self, frames_end: int) -> None:
        made = frames_end * self.spf
        while self.turns:
            t = self.turns[0]
            if t.start is not None and not t.started_sent and t.start < made:
                t.started_sent = True
                self.emit("event", {"type": "turn_started", "turn": t.id, "frame": t.start // self.spf})
            if t.end is None or t.end > made:
                return
            self.turns.popleft()
            event = {"type": "turn_ended", "turn": t.id, "frame": -(-t.end // self.spf)}
            if t.interrupted:
                event["interrupted"] = True
            self.emit("event", event)

    def close(self) -> None:
        """Called by the engine thread once the session is removed: frees the stream's threads."""
        self.closed = True
        self.avatar.close()

    def stats_message(self, now: float) -> dict[str, Any]:
        st = self.stats
        fps = 0.0
        if len(st.recent) > 1 and st.recent[-1][0] > st.recent[0][0]:
            fps = (st.recent[-1][1] - st.recent[0][1]) / (st.recent[-1][0] - st.recent[0][0])
        pos = self.position(now)
        st.stalls.append((now, self.stall))
        while len(st.stalls) > 2 and now - st.stalls[1][0] >= REALTIME_WINDOW_S:
            st.stalls.popleft()
        stall_old, span = st.stalls[0][1], now - st.stalls[0][0]
        realtime = span <= 0 or (self.stall - stall_old) < REALTIME_STALL * max(span, 1.0)
        return {"type": "stats", "frames": st.frames, "fps": round(fps, 2), "target_fps": self.fps,
                "realtime": realtime, "ahead_s": round(st.frames / self.fps - pos, 3),
                "stall_s": round(self.stall, 3),
                "block_ms": round(1000 * st.last_block_s, 1), "pending_s": round(self.pending / self.rate, 2),
                "state": self.state()}
