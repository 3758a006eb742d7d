"""Responders: what the avatar says back to a user's turn.

- `echo` (default): the avatar speaks the user's own audio as it arrives (streaming). For lip-sync
  checks, and for an external agent that sends the reply audio itself (its TTS) as the "user" audio.
- `file:PATH`: one reply per turn from an audio file, or from a folder's audio files in name order,
  cycling.
- `command:CMD`: a local program gets the user's turn as a WAV file on stdin and writes the reply
  (any audio PyAV decodes) to stdout; run without a shell (`shlex.split`).
- `http:URL`: the turn is POSTed as `audio/wav`; the response body is the reply audio.

Every non-echo responder runs after the turn ends (`end_turn`), off the event loop, bounded by a
timeout; nothing is downloaded.
"""

from __future__ import annotations

import io
import shlex
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livetalk_cli.errors import UserError
from livetalk_cli.media import SAMPLE_RATE, decode_audio, load_audio, write_wav

AUDIO_SUFFIXES = (".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".opus")


class ResponderError(Exception):
    """The responder could not produce a reply (the session carries on, idle)."""


@dataclass
class Responder:
    """Base: `streaming` responders speak the user's audio as it arrives; others `reply` per turn."""

    name: str = "echo"
    streaming: bool = True

    def reply(self, turn: np.ndarray, timeout: float) -> np.ndarray:
        """The user's turn (float32 16 kHz mono) -> the audio to speak (the same format)."""
        return turn


class FileResponder(Responder):
    def __init__(self, path: Path):
        super().__init__(f"file:{path}", streaming=False)
        if path.is_dir():
            self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
            if not self.files:
                raise UserError(f"--responder file: no audio files ({', '.join(AUDIO_SUFFIXES)}) in {path}")
        elif path.is_file():
            self.files = [path]
        else:
            raise UserError(f"--responder file: not found: {path}")
        self.turn = 0

    def reply(self, turn: np.ndarray, timeout: float) -> np.ndarray:
        path = self.files[self.turn % len(self.files)]
        self.turn += 1
        return load_audio(path, SAMPLE_RATE)


class CommandResponder(Responder):
    def __init__(self, command: str):
        super().__init__(f"command:{command}", streaming=False)
        self.argv = shlex.split(command)
        if not self.argv:
            raise UserError("--responder command: needs a program to run")

    def reply(self, turn: np.ndarray, timeout: float) -> np.ndarray:
        try:
            done = subprocess.run(self.argv, input=wav_bytes(turn), capture_output=True, timeout=timeout,
                                  check=False)
        except FileNotFoundError:
            raise ResponderError(f"responder program not found: {self.argv[0]}") from None
        except subprocess.TimeoutExpired:
            raise ResponderError(f"responder program ran over {timeout:.0f} s") from None
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise ResponderError(f"responder program exited with {done.returncode}: {tail[0]}")
        return _decode_reply(done.stdout)


class HttpResponder(Responder):
    def __init__(self, url: str):
        super().__init__(f"http:{url}", streaming=False)
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--responder http: needs an http(s) URL, got {url!r}")
        self.url = url

    def reply(self, turn: np.ndarray, timeout: float) -> np.ndarray:
        req = urllib.request.Request(self.url, data=wav_bytes(turn), headers={"Content-Type": "audio/wav"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return _decode_reply(resp.read())
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise ResponderError(f"responder endpoint failed: {e}") from None


def _decode_reply(data: bytes) -> np.ndarray:
    if not data:
        raise ResponderError("the responder returned no audio")
    try:
        return decode_audio(data, SAMPLE_RATE)
    except UserError as e:
        raise ResponderError(f"the responder's reply: {e}") from None


def wav_bytes(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """float32 mono -> the bytes of a PCM16 WAV file."""
    buf = io.BytesIO()
    write_wav(buf, audio, sample_rate)
    return buf.getvalue()


def parse_responder(spec: str) -> Responder:
    """--responder: echo | file:PATH | command:CMD | http:URL."""
    kind, _, arg = spec.partition(":")
    if kind == "echo" and not arg:
        return Responder()
    if kind == "file" and arg:
        return FileResponder(Path(arg).expanduser())
    if kind == "command" and arg:
        return CommandResponder(arg)
    if kind == "http" and arg:
        return HttpResponder(arg)
    raise UserError(f"--responder {spec!r}: use echo, file:PATH, command:CMD or http:URL")
