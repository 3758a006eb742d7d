"""Audio in, avatar frames out, one block at a time: the per-block sequence render, bench, the
distill report and serving share (`AvatarStream`: sample → decode → refill → commit).

Block n holds latent frames [n*bf, (n+1)*bf). Latent 0 is the reference image and decodes to one
video frame; every later latent decodes to `tf` (4) frames. So block 0 yields 1 + tf*(bf-1) video
frames and later blocks tf*bf, and video frame i is conditioned on the audio of frame i.
Latents are decoded as soon as their block is sampled (streaming VAE cache), so memory does not
grow with the stream's length.

Legend: B batch, C latent channels, f block frames, T video frames, H/W image size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from livetalk_cli.config import latents_for_video_frames
from livetalk_cli.errors import UserError
from livetalk_cli.kernels.sink_ring import resolve_backend
from livetalk_cli.models.audio import frame_features, samples_per_frame, window_frames
from livetalk_cli.models.dit import Conditioning, pack_audio_frames
from livetalk_cli.models.vae import StillReference
from livetalk_cli.pipeline import LoadedModel
from livetalk_cli.runtime.threads import intra_op_threads, team_size
from livetalk_cli.runtime.vae_stream import VAEStream, still_latents_needed
from livetalk_cli.sampling.accel import check_cuda_graphs
from livetalk_cli.sampling.block_sampler import BlockSampler


class NonFiniteOutput(UserError):
    """The model produced NaN or infinite values (bad weights or an unstable dtype)."""


def block_video_range(n: int, block_frames: int, temporal_factor: int) -> tuple[int, int]:
    """Video frames [start, end) that block n decodes to."""
    start = 0 if n == 0 else temporal_factor * (n * block_frames - 1) + 1
    return start, temporal_factor * ((n + 1) * block_frames - 1) + 1


def blocks_for_video_frames(num_frames: int, block_frames: int, temporal_factor: int) -> int:
    return math.ceil(latents_for_video_frames(num_frames, temporal_factor) / block_frames)


def frames_to_uint8(video: Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] → (T, H, W, 3) uint8 on the host; NaN/inf is an error here,
    where frames are emitted, not in the per-block path."""
    host = video[0].permute(1, 2, 3, 0).float().cpu()
    if not torch.isfinite(host).all():
        raise NonFiniteOutput("the model produced NaN/inf frames; check the checkpoint and --dtype")
    return ((host + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def check_engine_options(*, compile: bool, cuda_graphs: bool) -> None:
    """Exported engines run their own compiled code: the eager-only switches are an error with them."""
    if compile or cuda_graphs:
        raise UserError("--engine runs exported components: --compile and --cuda-graphs apply to eager only")


@dataclass(frozen=True)
class StreamOptions:
    """How a stream runs (render and bench share these switches)."""

    pipelined: bool = True  # DiT of block n+1 overlaps the VAE decode of block n
    compile: bool = False  # torch.compile the block step (fullgraph, static shapes)
    cuda_graphs: bool = False  # replay the block step from CUDA graphs (CUDA only)
    compile_backend: str = "inductor"
    split_threads: bool = True  # CPU pipeline: half the intra-op threads to the DiT, half to the decoder
    threads: int | None = None  # CPU thread budget of the stream (None: OMP_NUM_THREADS or one per core)
    attention: str = "auto"  # the cached window's attention backend (models.attention.ATTENTION_BACKENDS)

    def label(self) -> str:
        on = [n for n, v in (("pipelined", self.pipelined), ("compile", self.compile),
                             ("cuda-graphs", self.cuda_graphs)) if v]
        on += [f"attention={self.attention}"] if self.attention not in ("auto", "sdpa") else []
        return "+".join(on) or "sequential eager"


class AvatarStream:
    """One avatar stream: `start()` once, then per block `sample()` → `decode()` → `refill()`
    (or `next_block()`, which does all three). `sample` and `refill` touch the DiT and its KV cache,
    `decode` only the VAE and its cache, so a pipeline may run them on different threads/streams
    (see `stream_video`)."""

    def __init__(self, model: LoadedModel, options: StreamOptions = StreamOptions()):
        cfg = model.cfg
        compile, cuda_graphs = options.compile, options.cuda_graphs
        if not cfg.dit.has_audio:
            raise UserError(f"preset {cfg.name!r} has no audio conditioning; use an omniavatar preset")
        if cuda_graphs:
            check_cuda_graphs(model.device)
        self.model, self.cfg = model, cfg
        engines = model.engines
        if engines is not None:
            check_engine_options(compile=compile, cuda_graphs=cuda_graphs)
        passes = engines.passes if engines is not None else None
        attention = resolve_backend(options.attention, model.device, next(model.dit.parameters()).dtype,
                                    cfg.dit.head_dim) if passes is None else "sdpa"  # engines: fixed at export
        self.sampler = BlockSampler(model.dit, cfg, device=model.device, passes=passes, attention=attention)
        if compile or cuda_graphs:
            self.sampler.accelerate(compile=compile, cuda_graphs=cuda_graphs, backend=options.compile_backend)
        self.options = options
        self.spf = samples_per_frame(cfg.audio.sample_rate, cfg.fps)
        self.context_frames, self.lookahead_frames = window_frames(cfg.audio, cfg.fps)
        self.tf = cfg.vae.temporal_factor
        # intra-op threads of each of the stream's threads (CPU; None on GPU without --threads)
        self.team_size = team_size(options.threads, pipelined=options.pipelined, split=options.split_threads,
                                   device=model.device)
        self.generator = torch.Generator(device=model.device)
        self.vae_dtype = next(model.vae.parameters()).dtype
        self._worker: ThreadPoolExecutor | None = None
        self.block = 0  # the next block `sample` makes
        self.decoded = 0  # blocks `decode` has consumed

    def start(self, image: Tensor, prompt: str, seed: int = 0) -> None:
        """image: (3, H, W) in [-1, 1] at the preset's resolution. Runs with the stream's team size
        (the reference encode is on the way to the first frame)."""
        with torch.no_grad(), intra_op_threads(self.team_size):
            self._start(image, prompt, seed)

    def _start(self, image: Tensor, prompt: str, seed: int) -> None:
        m = self.model
        image = image[None, :, None].to(m.device, self.vae_dtype)
        # the first block waits only for its own positions' reference latents; later blocks extend them
        self.reference = StillReference(m.vae, image, self.cfg.still_reference_latents)
        ref = self.reference.upto(self.cfg.stream.block_frames)  # (1, C, R, h, w); the sampler keeps fp32
        self.sampler.start(self._text_kv(prompt), ref if self.cfg.dit.has_reference else None)
        sc = self.cfg.stream
        decoder = m.engines.decoder if m.engines is not None and m.engines.decoder is not None else m.vae
        need = still_latents_needed(sc)  # the settled frame 0 and the anchor's still past
        still = self.reference.upto(need) if need else None
        self.vae_side = VAEStream.for_stream(decoder, sc, dtype=self.vae_dtype, still=still)
        self.generator.manual_seed(seed)
        self.block = self.decoded = 0

    @torch.no_grad()
    def set_prompt(self, prompt: str) -> None:
        """The prompt of the blocks still to come; the KV cache and the VAE stream carry on."""
        self.sampler.text_kv = self._text_kv(prompt)

    def _text_kv(self, prompt: str) -> list[tuple[Tensor, Tensor]]:
        m = self.model
        return m.dit.prepare_text(m.text_encoder([prompt]).to(m.device))

    def worker(self) -> ThreadPoolExecutor:
        """The stream's DiT thread for pipelined streaming. It lives as long as the stream: a new
        thread per stream would pay the BLAS/oneDNN per-thread set-up on every first frame."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livetalk-dit")
        return self._worker

    def close(self) -> None:
        """End the worker thread (also happens when the stream is garbage collected)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def video_range(self, n: int | None = None) -> tuple[int, int]:
        """Video frames [start, end) of block n (default: the next block to sample)."""
        return block_video_range(self.block if n is None else n, self.cfg.stream.block_frames, self.tf)

    def audio_needed(self, n: int) -> int:
        """Video frames of audio that must have arrived before block n can start (its frames plus the
        encoder's look-ahead): the algorithmic latency of the first block is audio_needed(0) / fps."""
        return self.video_range(n)[1] + self.lookahead_frames

    @torch.no_grad()
    def block_audio(self, wave: Tensor, wave_start: int = 0) -> Tensor:
        """Audio conditioning of the next block: (num_audio_layers, 1, f, D). wave: samples
        [wave_start, wave_start + S) of the stream (`frame_features`)."""
        m = self.model
        start, end = self.video_range()
        feats = frame_features(
            m.audio_encoder, wave, self.spf, start, end - start, self.context_frames, self.lookahead_frames,
            wave_start,
        )
        packed = pack_audio_frames(feats[None].float(), stream_start=self.block == 0, pack=self.tf)
        return m.dit.prepare_audio(packed.to(m.device))

    def block_noise(self) -> Tensor:
        cfg = self.cfg
        h, w = cfg.latent_hw
        return torch.randn(
            (cfg.stream.num_steps, 1, cfg.dit.out_dim, cfg.stream.block_frames, h, w),
            generator=self.generator, device=self.model.device,
        )

    @torch.no_grad()
    def sample(self, wave: Tensor, wave_start: int = 0) -> tuple[Tensor, Conditioning]:
        """wave: (S,) float32 16 kHz audio from sample `wave_start` (sample 0 = frame 0) → the next
        block's clean latents (1, C, f, h, w) and the conditioning `refill` needs. Call `refill`
        before the next `sample`."""
        return self.sample_block(self.block_audio(wave, wave_start))

    @torch.no_grad()
    def sample_block(self, audio: Tensor) -> tuple[Tensor, Conditioning]:
        """`sample` from the block's audio conditioning (`block_audio`)."""
        if self.cfg.dit.has_reference:
            self.sampler.extend_reference(self.reference.upto((self.block + 1) * self.cfg.stream.block_frames))
        return self.sampler.denoise(self.block_noise(), audio)

    @torch.no_grad()
    def refill(self, x0: Tensor, cond: Conditioning) -> None:
        """Write the sampled block into the KV cache; the stream moves to the next block."""
        self.sampler.refill(x0, cond)
        self.block += 1

    def decode_parts(self, z: Tensor) -> list[Tensor]:
        """How a sampled block is decoded: block 0 in two chunks, the reference latent + the first
        generated latent first, so the first generated frame leaves the decoder before the rest of
        the block is decoded; later blocks whole."""
        parts = [z[:, :, :2], z[:, :, 2:]] if self.decoded == 0 and z.shape[2] > 2 else [z]
        self.decoded += 1
        return parts

    @torch.no_grad()
    def decode_part(self, z: Tensor) -> Tensor:
        """Latents (1, C, f, h, w) → video (1, 3, T, H, W) in [-1, 1], continuing the VAE stream."""
        return self.vae_side.decode(z)

    def decode(self, x0: Tensor, ready: Any = None, vae_stream: Any = None) -> Iterator[Tensor]:
        """A sampled block's latents → its video chunks (1, 3, T, H, W), one per `decode_parts` chunk,
        each yielded as soon as it is decoded. On GPU with `vae_stream`: decoded on that stream after
        the DiT's `ready` event, and the caller's stream waits for each chunk."""
        if vae_stream is None:
            z = x0.to(self.vae_dtype)
        else:
            with torch.cuda.stream(vae_stream):
                vae_stream.wait_event(ready)
                x0.record_stream(vae_stream)  # x0 was allocated on the DiT's stream
                z = x0.to(self.vae_dtype)
        if vae_stream is None:
            self.vae_side.begin_block()
        else:
            with torch.cuda.stream(vae_stream):
                self.vae_side.begin_block()
        for part in self.decode_parts(z):
            if vae_stream is None:
                yield self.decode_part(part)
                continue
            with torch.cuda.stream(vae_stream):
                video = self.decode_part(part)
            torch.cuda.current_stream().wait_stream(vae_stream)  # the caller reads the frames
            yield video

    def next_block(self, wave: Tensor, wave_start: int = 0) -> Tensor:
        """sample → decode → refill: the next block's video (1, 3, T, H, W)."""
        x0, cond = self.sample(wave, wave_start)
        video = list(self.decode(x0))
        self.refill(x0, cond)
        return torch.cat(video, dim=2)


