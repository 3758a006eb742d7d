"""A live avatar session: start with a face and a prompt, feed audio as it arrives, get video.

`AvatarSession` is what a server holds per connection. Each block is made as soon as its audio
(its frames plus the encoder's look-ahead) has arrived, by the same per-block sequence render
uses (`AvatarStream`: sample → decode → refill → commit). Between turns the prompt can change
(`set_prompt`) while the KV cache — the avatar's visual memory, with its identity sinks — and the
VAE stream carry on. Audio lives in a bounded `AudioBuffer`, so a session of any length holds
only the few seconds its next block can still read.

Fed the same samples in any pieces, a session gives exactly the frames `render` gives for them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from livetalk_cli.models.audio import audio_window_samples
from livetalk_cli.pipeline import LoadedModel
from livetalk_cli.runtime.audio_buffer import AudioBuffer
from livetalk_cli.runtime.stream import AvatarStream, StreamOptions, frames_to_uint8


class AvatarSession:
    def __init__(self, model: LoadedModel, *, options: StreamOptions | None = None, buffer_s: float = 30.0):
        self.stream = AvatarStream(model, options or StreamOptions(pipelined=False))
        self.buffer = AudioBuffer(int(buffer_s * model.cfg.audio.sample_rate))
        self.started = False

    @property
    def frames_done(self) -> int:
        """Video frames produced so far."""
        return self.stream.video_range(self.stream.block)[0]

    def start(self, image: Tensor, prompt: str, seed: int = 0) -> None:
        """image: (3, H, W) in [-1, 1] at the preset's resolution. Starts a new stream."""
        self.stream.start(image, prompt, seed)
        self.buffer = AudioBuffer(self.buffer.capacity)
        self.started = True

    def set_prompt(self, prompt: str) -> None:
        """The prompt of the blocks to come; the cache (visual memory) is kept."""
        self._check_started()
        self.stream.set_prompt(prompt)

    def feed(self, pcm: np.ndarray | Tensor) -> list[np.ndarray]:
        """Append audio (mono, 16 kHz, float or int16) → uint8 frames (T, H, W, 3) of every block
        whose audio is now complete (often none: a block needs 12 frames of audio + look-ahead)."""
        self._check_started()
        self.buffer.push(pcm)
        out = []
        while self.ready():
            out.append(self._next())
        return out

    def flush(self) -> list[np.ndarray]:
        """End of a turn: the blocks that cover every sample received, the missing audio after it
        taken as silence. The last block can run past the audio (it is a whole block)."""
        self._check_started()
        spf, received = self.stream.spf, self.buffer.end
        out = []
        while self.frames_done * spf < received:
            missing = self.window_end() - self.buffer.end
            if missing > 0:
                self.buffer.push(torch.zeros(missing))
            out.append(self._next())
        return out

    def close(self) -> None:
        self.stream.close()
        self.started = False

    def window_end(self) -> int:
        """Absolute sample index one past the last sample the next block reads (its frames plus the
        encoder's look-ahead): the next block can be made once `buffer.end` reaches it."""
        return self._window(self.stream.block)[1]

    def ready(self) -> bool:
        return self.started and self.buffer.end >= self.window_end()

    def next_block(self) -> tuple[np.ndarray, np.ndarray]:
        """Make the next block (`ready()` must hold) → its uint8 frames (T, H, W, 3) and the audio of
        exactly those frames (T * samples-per-frame float32 samples), what a player plays with them."""
        self._check_started()
        if not self.ready():
            raise RuntimeError("the next block's audio has not all arrived")
        spf = self.stream.spf
        start, end = self.stream.video_range()
        wave, offset = self.buffer.view()
        audio = wave[start * spf - offset: end * spf - offset].numpy().copy()
        return self._next(), audio

    def silence_unrendered(self) -> None:
        """Zero the audio held for frames not made yet (an interruption: what was said but not yet
        rendered is dropped; the frames already made keep theirs)."""
        self._check_started()
        self.buffer.silence_from(self.frames_done * self.stream.spf)

    def _check_started(self) -> None:
        if not self.started:
            raise RuntimeError("call start() before feeding audio")

    def _window(self, n: int) -> tuple[int, int]:
        """Samples [first, end) the audio features of block n read."""
        s = self.stream
        start, end = s.video_range(n)
        return audio_window_samples(s.model.audio_encoder, s.spf, start, end - start, s.context_frames,
                                    s.lookahead_frames)

    @torch.no_grad()
    def _next(self) -> np.ndarray:
        wave, offset = self.buffer.view()
        video = self.stream.next_block(wave, offset)
        self.buffer.drop_before(self._window(self.stream.block)[0])  # what the next block still reads
        return frames_to_uint8(video)
