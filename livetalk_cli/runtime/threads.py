"""CPU thread counts of a stream: how many intra-op threads each of its threads runs with.

Measured on the demo model on 2 cores (`reports/bench/README.md`): an OpenMP team of two threads
collapses when another program takes one of the cores (its threads spin at every barrier while
their partner waits for a time slice: the first frame went 0.23 -> 0.96-13 s, sequential FPS
37 -> 7), while single-thread teams lose only the CPU time the other program takes. So a
pipelined stream gives each of its two threads (the caller's, which decodes, and the DiT
worker's) half the threads for its whole life, the first block and `start()` included: on a quiet
2-core machine the first frame costs ~0.1 s more than with a 2-thread team, under load it stays
within 2x of that instead of 4-50x. A sequential stream runs one team of every thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_TORCH_DEFAULT = torch.get_num_threads()  # before any stream changed it


def total_threads(requested: int | None) -> int:
    """The stream's thread budget: --threads, else OMP_NUM_THREADS, else torch's default (one per core)."""
    if requested:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else _TORCH_DEFAULT


def team_size(requested: int | None, *, pipelined: bool, split: bool, device: torch.device) -> int | None:
    """Intra-op threads of each of the stream's threads on CPU (None: leave torch's setting, GPU)."""
    if device.type != "cpu":
        return requested
    total = total_threads(requested)
    return max(1, total // 2) if pipelined and split else total


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` intra-op threads on this thread, then restore (None: unchanged)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
