"""Audio in, avatar frames out, one block at a time — the loop render, bench and serve share.

Block n holds latent frames [n*bf, (n+1)*bf). Latent 0 is the reference image and decodes to one
video frame; every later latent decodes to `tf` (4) frames. So block 0 yields 1 + tf*(bf-1) video
frames and later blocks tf*bf, and video frame i is conditioned on the audio of frame i.
Latents are decoded as soon as their block is sampled (streaming VAE cache), so memory does not
grow with the stream's length.

Legend: B batch, C latent channels, f block frames, T video frames, H/W image size.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from livetalk_cli.config import latents_for_video_frames
from livetalk_cli.errors import UserError
from livetalk_cli.models.audio import frame_features, samples_per_frame, window_frames
from livetalk_cli.models.dit import Conditioning, pack_audio_frames
from livetalk_cli.models.vae import StillReference, WanVAE
from livetalk_cli.pipeline import LoadedModel
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


class VAEStream:
    """The VAE side of a stream: latents in, frames out, the causal decoder's cache carried over.

    With `anchor_every` > 0 the cache is rebuilt, before every `anchor_every`-th block, by decoding
    (and dropping) the stream's first latent followed by its last `history` latents, so the
    decoder always has the reference frame in its history (see `StreamConfig.vae_anchor_every`).
    That costs one decode of 1 + `history` latents per `anchor_every` blocks."""

    def __init__(self, vae: WanVAE, anchor_every: int = 0, history: int = 2):
        self.vae, self.every, self.history = vae, anchor_every, history
        self.dtype = next(vae.parameters()).dtype
        self.cache = vae.new_decode_cache()
        self.first: Tensor | None = None
        self.recent: Tensor | None = None
        self.blocks = 0

    @torch.no_grad()
    def begin_block(self) -> None:
        """Call once before decoding each block's latents."""
        if self.every and self.blocks and self.blocks % self.every == 0 and self.first is not None:
            self.cache = self.vae.new_decode_cache()  # `recent` stays None when history is 0
            anchor = self.first if self.recent is None else torch.cat([self.first, self.recent], 2)
            self.vae.decode_step(anchor, self.cache)
        self.blocks += 1

    def decode(self, z: Tensor) -> Tensor:
        """Latents (1, C, f, h, w) → video (1, 3, T, H, W) in [-1, 1], continuing the stream."""
        z = z.to(self.dtype)
        if self.first is None:
            self.first = z[:, :, :1]
        if self.every and self.history:
            self.recent = (z if self.recent is None else torch.cat([self.recent, z], 2))[:, :, -self.history:]
        return self.vae.decode_step(z, self.cache)


@dataclass(frozen=True)
class StreamOptions:
    """How a stream runs (render and bench share these switches)."""

    pipelined: bool = True  # DiT of block n+1 overlaps the VAE decode of block n
    compile: bool = False  # torch.compile the block step (fullgraph, static shapes)
    cuda_graphs: bool = False  # replay the block step from CUDA graphs (CUDA only)
    compile_backend: str = "inductor"
    split_threads: bool = True  # CPU pipeline: half the intra-op threads to the DiT, half to the decoder

    def label(self) -> str:
        on = [n for n, v in (("pipelined", self.pipelined), ("compile", self.compile),
                             ("cuda-graphs", self.cuda_graphs)) if v]
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
        if cuda_graphs and model.device.type != "cuda":
            raise UserError("CUDA graphs need a CUDA device (--device cuda)")
        self.model, self.cfg = model, cfg
        self.sampler = BlockSampler(model.dit, cfg, device=model.device)
        if compile or cuda_graphs:
            self.sampler.accelerate(compile=compile, cuda_graphs=cuda_graphs, backend=options.compile_backend)
        self.options = options
        self.spf = samples_per_frame(cfg.audio.sample_rate, cfg.fps)
        self.context_frames, self.lookahead_frames = window_frames(cfg.audio, cfg.fps)
        self.tf = cfg.vae.temporal_factor
        self.generator = torch.Generator(device=model.device)
        self.vae_dtype = next(model.vae.parameters()).dtype
        self._worker: ThreadPoolExecutor | None = None
        self.block = 0  # the next block `sample` makes
        self.decoded = 0  # blocks `decode` has consumed

    @torch.no_grad()
    def start(self, image: Tensor, prompt: str, seed: int = 0) -> None:
        """image: (3, H, W) in [-1, 1] at the preset's resolution."""
        m = self.model
        image = image[None, :, None].to(m.device, self.vae_dtype)
        # the first block waits only for its own positions' reference latents; later blocks extend them
        self.reference = StillReference(m.vae, image, self.cfg.still_reference_latents)
        ref = self.reference.upto(self.cfg.stream.block_frames)  # (1, C, R, h, w); the sampler keeps fp32
        text_kv = m.dit.prepare_text(m.text_encoder([prompt]).to(m.device))
        self.sampler.start(text_kv, ref if self.cfg.dit.has_reference else None)
        self.vae_side = VAEStream(m.vae, self.cfg.stream.vae_anchor_every, self.cfg.stream.vae_anchor_history)
        self.generator.manual_seed(seed)
        self.block = self.decoded = 0

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
    def block_audio(self, wave: Tensor) -> Tensor:
        """Audio conditioning of the next block: (num_audio_layers, 1, f, D)."""
        m = self.model
        start, end = self.video_range()
        feats = frame_features(
            m.audio_encoder, wave, self.spf, start, end - start, self.context_frames, self.lookahead_frames
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
    def sample(self, wave: Tensor) -> tuple[Tensor, Conditioning]:
        """wave: (S,) float32 16 kHz audio so far (sample 0 = frame 0) → the next block's clean latents
        (1, C, f, h, w) and the conditioning `refill` needs. Call `refill` before the next `sample`."""
        audio = self.block_audio(wave)
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

    def next_block(self, wave: Tensor) -> Tensor:
        """sample → decode → refill: the next block's video (1, 3, T, H, W)."""
        x0, cond = self.sample(wave)
        video = list(self.decode(x0))
        self.refill(x0, cond)
        return torch.cat(video, dim=2)


def stream_video(stream: AvatarStream, wave: Tensor, num_blocks: int, *, depth: int = 2) -> Iterator[Tensor]:
    """Video chunks (1, 3, T, H, W) of `num_blocks` blocks, in order; `stream.start()` must have run.

    Sequential: sample, decode, refill, block after block. Pipelined: the DiT (sample + refill) runs
    in a worker thread up to `depth` blocks ahead, while the caller's thread decodes (on GPU, on its
    own CUDA stream), so block n+1 is denoised while block n is decoded. On CPU the caller's thread
    samples block 0 and decodes its first chunk itself first (the first frame), then the worker takes
    over from block 0's refill. Both give identical frames.
    """
    if not stream.options.pipelined:
        for _ in range(num_blocks):
            x0, cond = stream.sample(wave)
            yield from stream.decode(x0)
            stream.refill(x0, cond)
        return
    cuda = stream.model.device.type == "cuda"
    vae_stream = torch.cuda.Stream(stream.model.device) if cuda else None
    q: queue.Queue[tuple[str, Any, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    first_out = threading.Event()  # set once the first chunk (the first generated frame) is decoded

    def put(item: tuple[str, Any, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    # On CPU the DiT thread and the decoding thread each get half the intra-op threads: two
    # OpenMP teams of the full size would fight over the same cores (measured on 2 cores: 1 + 1
    # threads beat 2 + 2 on both FPS and first-frame latency).
    total_threads = torch.get_num_threads()
    per_stage = max(1, total_threads // 2) if not cuda and stream.options.split_threads else total_threads
    # On CPU the first frame comes first: block 0 is sampled and its first chunk decoded here, in
    # order, with every thread (nothing could overlap them anyway), and the worker starts from
    # block 0's refill. Handing block 0 to a half-size worker team cost the first frame ~60 ms on
    # 2 cores; switching a thread's team size back and forth cost more than it saved.
    first: tuple[Tensor, Conditioning] | None = None
    block0: Iterator[Tensor] = iter(())  # block 0's chunks, the first one already decoded
    if not cuda and num_blocks > 0:
        first = stream.sample(wave)
        parts = stream.decode(first[0])
        block0 = itertools.chain([next(parts)], parts)
        first_out.set()

    def produce() -> None:
        torch.set_num_threads(per_stage)  # this thread's team (and the BLAS pools)
        try:
            with torch.no_grad():  # grad mode is per thread
                if first is not None:
                    stream.refill(*first)
                for n in range(0 if first is None else 1, num_blocks):
                    x0, cond = stream.sample(wave)
                    ready = None
                    if cuda:
                        ready = torch.cuda.Event()
                        ready.record()
                    if not put(("block", x0, ready)):
                        return
                    if n == 0:  # the first frame first: do not compete with its decode
                        while not first_out.wait(0.05):
                            if stop.is_set():
                                return
                    stream.refill(x0, cond)
            put(("end", None, None))
        except BaseException as e:  # handed to the consumer, raised there
            put(("error", e, None))

    torch.set_num_threads(per_stage)
    done = stream.worker().submit(produce)
    try:
        yield from block0  # its later chunks are decoded while the worker refills and samples block 1
        while True:
            kind, x0, ready = q.get()
            if kind == "end":
                break
            if kind == "error":
                raise x0
            for chunk in stream.decode(x0, ready, vae_stream):
                first_out.set()
                yield chunk
    finally:
        stop.set()
        done.result()  # the worker has left `produce` (its errors were handed over above)
        torch.set_num_threads(total_threads)

