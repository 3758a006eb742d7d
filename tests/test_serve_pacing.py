"""LiveSession's pacing on a simulated clock (demo model, CPU): a turn streamed in real time by a
microphone is placed where its audio keeps up with the blocks, so the timeline never gets silence
inside the turn, and no later than that."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from livetalk_cli.media import load_audio, load_image
from livetalk_cli.pipeline import load_model
from livetalk_cli.serve.live import LiveSession, MediaBlock
from livetalk_cli.serve.protocol import Limits
from livetalk_cli.serve.responders import parse_responder

ROOT = Path(__file__).resolve().parents[1]
CHUNK_S = 0.1  # the microphone sends 100 ms chunks, each once it is recorded


@pytest.fixture(scope="module")
def model():
    return load_model(checkpoint=None, preset_name=None, random_weights=False, device=torch.device("cpu"),
                      dtype=torch.float32, seed=0)


def _simulate(model, turn: np.ndarray, turn_at: float, backlog: tuple[float, float], make_s: float,
              chunk_s: float = CHUNK_S):
    """One session on a simulated clock, driven as the engine drives it: `plan`, then `work` when
    due, each block taking `make_s`. The turn's chunks arrive in real time from `turn_at` (wall
    seconds after the first block); the engine's backlog estimate is backlog[0] until the turn's
    first block is made, backlog[1] after (as when another session joins)."""
    now = 0.0
    events: list[dict] = []
    media: list[MediaBlock] = []

    def emit(kind, payload):
        (media if kind == "media" else events).append(payload)

    s = LiveSession("sim", model, parse_responder("echo"), Limits(), emit=emit, clock=lambda: now)
    image = load_image(ROOT / "examples" / "face.png", model.cfg.height, model.cfg.width)
    s.request_start(image, "a person talking", 0)
    rate, chunk = s.rate, int(chunk_s * s.rate)
    chunks = [turn[i: i + chunk] for i in range(0, len(turn), chunk)]
    arrive = None  # wall time of each chunk, set once the first block is made
    sent, look, started = 0, 0, False
    while True:
        if arrive is not None:
            while sent < len(chunks) and arrive[sent] <= now:
                s.add_audio(chunks[sent])
                sent += 1
                if sent == len(chunks):
                    s.end_turn()
        if any(e["type"] == "turn_ended" for e in events) and len(media) > 2 + len(media[0].frames) and \
                media[-1].frame0 * s.spf > len(turn) + rate * 2:
            break
        plan = s.plan(now, backlog[1] if s.turns or started else backlog[0])
        if plan is not None and plan[0] <= now:
            s.work()
            started = started or bool(s.turns)  # the turn's first speech is placed
            now += make_s
            if arrive is None and s.t0 is not None:
                look = s.avatar.buffer.end - s.avatar.frames_done * s.spf
                arrive = [now + turn_at + (i + 1) * chunk_s for i in range(len(chunks))]
            continue
        wake = plan[0] if plan is not None else now + 0.25
        if arrive is not None and sent < len(chunks):
            wake = min(wake, arrive[sent])
        now = max(wake, now + 1e-6)
    timeline = np.concatenate([m.audio for m in media])
    return s, events, timeline, arrive, look / rate


def _placed(s: LiveSession, events: list[dict], timeline: np.ndarray, speech: np.ndarray) -> int:
    """The sample where `speech` starts in the timeline, checked to be there in one piece with
    silence all around, every block made in time."""
    start = next(e["frame"] for e in events if e["type"] == "turn_started") * s.spf
    while not np.array_equal(timeline[start: start + len(speech)], speech):
        start += 1
        assert start < len(timeline), "the turn is not in the timeline in one piece"
    rest = np.concatenate([timeline[:start], timeline[start + len(speech):]])
    assert not rest.any(), "silence before and after the turn"
    assert s.stall == 0.0, "every block was made before its frames were due"
    return start


def _speech(seconds: float) -> np.ndarray:
    speech = load_audio(ROOT / "examples" / "speech.wav")[: int(seconds * 16000)]
    return np.where(speech == 0, np.float32(1e-4), speech)  # no exact zeros: silence is told apart


@pytest.mark.parametrize(("turn_phase", "backlog"), [
    (0.0, (0.45, 0.45)),    # blocks slow enough that the idle lead (1.5x) is past 0.4 s
    (0.25, (0.45, 0.45)),
    (0.5, (0.45, 0.45)),
    (0.6, (0.2, 0.6)),      # the lead grows mid-turn: the streamed turn keeps the one it started with
])
def test_a_streamed_turn_plays_without_gaps_as_soon_as_its_audio_keeps_up(model, turn_phase, backlog):
    speech = _speech(1.6)
    block_s = model.cfg.stream.block_frames * model.cfg.vae.temporal_factor / model.cfg.fps
    s, events, timeline, arrive, look_s = _simulate(model, speech, 2.0 + turn_phase * block_s, backlog, make_s=0.3)
    start = _placed(s, events, timeline, speech)
    first_sample_at = arrive[0] - CHUNK_S

    idle = max(s.pacing.idle_lead_s, 1.5 * backlog[0])
    heard = s.t0 + start / s.rate - first_sample_at  # mouth-to-ear on the session's clock
    # its audio can keep up: a block's audio window, the idle lead and a chunk of arrival jitter
    # after its first sample (whose arrival the server knows to within a chunk)
    earliest = block_s + look_s + idle + CHUNK_S
    assert earliest - 1e-3 <= heard <= earliest + CHUNK_S + 1e-3, (heard, earliest)


@pytest.mark.parametrize("turn_phase", [0.0, 0.5])
def test_a_turn_sent_whole_starts_in_the_next_block_not_made_yet(model, turn_phase):
    speech = _speech(1.2)
    block_s = model.cfg.stream.block_frames * model.cfg.vae.temporal_factor / model.cfg.fps
    s, events, timeline, arrive, look_s = _simulate(model, speech, 2.0 + turn_phase * block_s, (0.2, 0.2),
                                                    make_s=0.3, chunk_s=len(speech) / 16000)
    start = _placed(s, events, timeline, speech)
    heard = s.t0 + start / s.rate - arrive[-1]  # from the moment all of it arrived
    idle = max(s.pacing.idle_lead_s, 1.5 * 0.2)
    assert 0 < heard <= idle + block_s + look_s + 1e-3, heard
