"""A bounded buffer of live audio: what a stream's next blocks can still need, and no more.

Audio arrives in pieces (16 kHz mono float32, sample 0 = the start of video frame 0). A block
needs the samples of its frames plus the audio encoder's context before and look-ahead after
(`models.audio.audio_window_samples`); everything older than the next block's context is dropped, so a
stream of any length holds a few seconds of audio at most. More than `capacity` samples waiting
is an error (the producer is outrunning the model), never unbounded growth.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from livetalk_cli.errors import UserError


class AudioBufferFull(UserError):
    """More audio arrived than the buffer holds: the stream is not keeping up."""


class AudioBuffer:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least one sample")
        self.capacity = capacity
        self._data = torch.zeros(0)
        self.start = 0  # absolute index of self._data[0]

    @property
    def end(self) -> int:
        """Samples received so far (absolute index one past the newest)."""
        return self.start + self._data.shape[0]

    def __len__(self) -> int:
        return self._data.shape[0]

    def push(self, pcm: np.ndarray | Tensor) -> None:
        """Append mono samples: float in [-1, 1], or int16 PCM (scaled by 1/32768)."""
        x = torch.as_tensor(np.asarray(pcm) if not isinstance(pcm, Tensor) else pcm)
        if x.ndim != 1:
            raise UserError(f"audio must be mono (one dimension), got shape {tuple(x.shape)}")
        x = x.float() / 32768.0 if x.dtype == torch.int16 else x.float()
        if len(self) + x.shape[0] > self.capacity:
            raise AudioBufferFull(
                f"audio buffer full ({self.capacity} samples): audio arrives faster than it is rendered")
        self._data = torch.cat([self._data, x])

    def view(self) -> tuple[Tensor, int]:
        """(the samples held, the absolute index of the first) for `frame_features`."""
        return self._data, self.start

    def drop_before(self, sample: int) -> None:
        """Forget every sample older than absolute index `sample`."""
        cut = min(max(0, sample - self.start), len(self))
        if cut:
            self._data = self._data[cut:].clone()
            self.start += cut

    def silence_from(self, sample: int) -> None:
        """Set every held sample from absolute index `sample` on to zero."""
        cut = max(0, sample - self.start)
        if cut < len(self):
            self._data[cut:] = 0
