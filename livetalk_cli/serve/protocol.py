"""The serve-local WebSocket API, version 1: message shapes, limits and the binary media packets.

Text frames are JSON objects with a "type". Binary frames from the client are PCM16 little-endian,
16 kHz mono audio; binary frames from the server are media packets: a 5-byte header
(kind: u8, index: u32 little-endian) then the payload.

    kind 1  JPEG video frame    index = frame number (pts = index / fps)
    kind 2  raw RGB24 frame     index = frame number; H * W * 3 bytes, row-major
    kind 3  PCM16 audio         index = first sample (pts = index / sample_rate), the avatar's speech
                                for exactly the frames sent before it

Client -> server: start, audio, end_turn, interrupt, prompt, webrtc_offer, close (see `README.md`).
Server -> client: started, state, turn_started, turn_ended, interrupted, prompt_set, stats,
webrtc_answer, error, closed. A bad message gets one `error` line and the session carries on.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
VIDEO_JPEG, VIDEO_RAW, AUDIO_PCM16 = 1, 2, 3
_HEADER = struct.Struct("<BI")
CLIENT_TYPES = ("start", "audio", "end_turn", "interrupt", "prompt", "webrtc_offer", "close")
VIDEO_FORMATS = ("jpeg", "raw", "none")


@dataclass(frozen=True)
class Limits:
    """What one connection may send; everything above is refused with an error line."""

    max_message_bytes: int = 16 * 2**20  # one WebSocket message (an image or an encoded audio file)
    max_image_pixels: int = 40_000_000
    max_prompt_chars: int = 2000
    max_turn_s: float = 120.0  # audio of one turn (what the user says, or the reply to speak)
    max_pending_s: float = 180.0  # speech waiting to be rendered
    idle_timeout_s: float = 300.0  # a session with no message for this long is closed
    max_sessions_per_client: int = 2
    responder_timeout_s: float = 60.0


class ProtocolError(Exception):
    """A message the server refuses: sent back as an `error` line; the session survives."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def error_message(code: str, message: str) -> str:
    return json.dumps({"type": "error", "code": code, "message": message.splitlines()[0] if message else code})


def parse_text(text: str, limits: Limits) -> dict[str, Any]:
    """A client's JSON message, its type and field types checked."""
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError("bad_json", f"not JSON: {e.msg} at character {e.pos}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("bad_message", "a message is a JSON object with a string 'type'")
    kind = msg["type"]
    if kind not in CLIENT_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected one of {', '.join(CLIENT_TYPES)}")
    for key, typ in _FIELDS.get(kind, {}).items():
        if key in msg and not isinstance(msg[key], typ) or isinstance(msg.get(key), bool) and typ is not bool:
            raise ProtocolError("bad_field", f"{kind}.{key} must be {_TYPE_NAMES[typ]}")
    if kind in ("start", "prompt") and len(msg.get("prompt", "")) > limits.max_prompt_chars:
        raise ProtocolError("too_large", f"prompt over {limits.max_prompt_chars} characters")
    if kind == "start" and msg.get("video", "jpeg") not in VIDEO_FORMATS:
        raise ProtocolError("bad_field", f"start.video must be one of {', '.join(VIDEO_FORMATS)}")
    if kind == "start" and msg.get("fit", "crop") not in ("crop", "pad"):
        raise ProtocolError("bad_field", "start.fit must be 'crop' or 'pad'")
    if kind == "start" and not 1 <= msg.get("jpeg_quality", 85) <= 100:
        raise ProtocolError("bad_field", "start.jpeg_quality must be within 1-100")
    if kind == "audio" and msg.get("format", "pcm16") not in ("pcm16", "file"):
        raise ProtocolError("bad_field", "audio.format must be 'pcm16' or 'file'")
    if kind in ("prompt", "webrtc_offer") and not all(k in msg for k in _REQUIRED[kind]):
        raise ProtocolError("bad_field", f"{kind} needs {', '.join(_REQUIRED[kind])}")
    return msg


_FIELDS: dict[str, dict[str, type]] = {
    "start": {"image": str, "prompt": str, "seed": int, "fit": str, "video": str, "jpeg_quality": int,
              "media": str},
    "audio": {"data": str, "format": str},
    "prompt": {"prompt": str},
    "webrtc_offer": {"sdp": str, "sdp_type": str},
}
_REQUIRED = {"prompt": ("prompt",), "webrtc_offer": ("sdp",)}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


def b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("bad_field", f"{what} is not valid base64") from None


def pack_media(kind: int, index: int, payload: bytes) -> bytes:
    return _HEADER.pack(kind, index) + payload


def unpack_media(data: bytes) -> tuple[int, int, bytes]:
    """(kind, index, payload) of a server media packet."""
    if len(data) < _HEADER.size:
        raise ValueError(f"media packet of {len(data)} bytes is shorter than its header")
    kind, index = _HEADER.unpack_from(data)
    return kind, index, data[_HEADER.size:]


def to_pcm16(samples: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> PCM16 little-endian bytes (x * 32768, the inverse of `from_pcm16`)."""
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


def from_pcm16(data: bytes) -> np.ndarray:
    """PCM16 little-endian bytes -> float32 samples (/ 32768)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
