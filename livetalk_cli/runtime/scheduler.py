"""The block scheduler: runs an `AvatarStream`'s per-block sequence sequentially, or pipelined
so that the DiT of block n+1 runs beside the VAE decode of block n (a worker thread; on a GPU the
decoder also gets its own CUDA stream). Thread counts are a `StreamOptions` setting, applied to
the stream's own threads for the stream's duration and restored after.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from livetalk_cli.models.dit import Conditioning
from livetalk_cli.runtime.stream import AvatarStream
from livetalk_cli.runtime.threads import intra_op_threads


def stream_video(stream: AvatarStream, wave: Tensor, num_blocks: int, *, depth: int = 2) -> Iterator[Tensor]:
    """Video chunks (1, 3, T, H, W) of `num_blocks` blocks, in order; `stream.start()` must have run.

    Sequential: sample, decode, refill, block after block. Pipelined: the DiT (sample + refill) runs
    in a worker thread up to `depth` blocks ahead, while the caller's thread decodes (on GPU, on its
    own CUDA stream), so block n+1 is denoised while block n is decoded. On CPU the caller's thread
    samples block 0 and decodes its first chunk itself first (the first frame), then the worker takes
    over from block 0's refill. The intra-op threads of the stream's threads on CPU are
    `AvatarStream.team_size` (`runtime.threads`), set for as long as the stream runs. Same
    switches and thread counts, same frames; sequential and pipelined differ by float rounding on
    CPU where their team sizes differ.
    """
    with intra_op_threads(stream.team_size):
        if stream.options.pipelined:
            yield from _pipelined(stream, wave, num_blocks, depth)
        else:
            for _ in range(num_blocks):  # the per-block sequence, in order
                x0, cond = stream.sample(wave)
                yield from stream.decode(x0)
                stream.refill(x0, cond)


def _pipelined(stream: AvatarStream, wave: Tensor, num_blocks: int, depth: int) -> Iterator[Tensor]:
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

    # On CPU the DiT thread and the decoding thread (this one) each run `stream.team_size` threads
    # (`runtime.threads`: half of them each, the first block included). The first frame comes
    # first: block 0 is sampled and its first chunk decoded here, in order (nothing could overlap
    # them anyway), and the worker starts from block 0's refill.
    first: tuple[Tensor, Conditioning] | None = None
    block0: Iterator[Tensor] = iter(())  # block 0's chunks, the first one already decoded
    if not cuda and num_blocks > 0:
        first = stream.sample(wave)
        parts = stream.decode(first[0])
        block0 = itertools.chain([next(parts)], parts)
        first_out.set()

    def produce() -> None:
        if stream.team_size is not None:
            torch.set_num_threads(stream.team_size)  # this thread's team, for the thread's life
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

