"""Optional speed-ups for the block sampler's hot path: `torch.compile` and CUDA-graph replay.

Both rely on what `block_sampler` guarantees: static shapes, no host syncs, and a KV cache whose
tensors are updated in place between blocks (their addresses never change during a stream).

`CudaGraphed` captures one function call into a CUDA graph and replays it. Every tensor argument
(noise, conditioning — a registered pytree —, reference, pin) is copied into a static buffer before
each replay, so callers pass fresh tensors as usual; modules and the cache's `KVWindow` are captured
by address (a different window object, e.g. the unmasked one once the cache is full, is a new
graph). The returned tensors are copies of the graph's static outputs (the next replay overwrites
those).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from livetalk_cli.errors import UserError
from livetalk_cli.models.attention import KVWindow

log = logging.getLogger(__name__)


def _is_leaf(obj: Any) -> bool:
    """Pytree leaves: tensors are copied into static buffers; modules and `KVWindow`s (the cache's
    persistent buffers, updated in place between blocks) are captured by address."""
    return isinstance(obj, KVWindow | torch.nn.Module)


def _signature(args: Any) -> tuple[list[Tensor], tuple]:
    """The tensors of args, and a key that changes when the argument structure, a tensor's shape,
    dtype or device, or a by-address object (module, window) changes."""
    leaves, spec = tree_flatten(args, is_leaf=_is_leaf)
    tensors = [x for x in leaves if isinstance(x, Tensor)]
    objects = tuple(("tensor", x.shape, x.dtype, x.device) if isinstance(x, Tensor) else ("object", id(x))
                    for x in leaves)
    return tensors, (str(spec), objects)


def _with_tensors(args: Any, tensors: list[Tensor]) -> Any:
    """args with its tensors replaced, in order, by `tensors`."""
    leaves, spec = tree_flatten(args, is_leaf=_is_leaf)
    it = iter(tensors)
    return tree_unflatten([next(it) if isinstance(x, Tensor) else x for x in leaves], spec)


def check_cuda_graphs(device: torch.device) -> None:
    """CUDA graphs need the model on a CUDA device: the one check, made before any work."""
    if device.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA device (--device cuda)")


class CudaGraphed:
    """fn(*args) replayed from a CUDA graph; re-captured if the argument structure or shapes change."""

    def __init__(self, fn: Callable[..., Any], warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self._key: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: list[Tensor] = []
        self._out: Any = None
        self._pool = None

    def __call__(self, *args: Any) -> Any:
        leaves, key = _signature(args)
        check_cuda_graphs(leaves[0].device if leaves else torch.device("cpu"))
        if key != self._key:
            self._capture(args, leaves, key)
        else:
            for dst, src in zip(self._static, leaves, strict=True):
                dst.copy_(src)
        assert self._graph is not None
        self._graph.replay()
        return tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, self._out)  # next replay overwrites

    def _capture(self, args: Any, leaves: list[Tensor], key: tuple) -> None:
        log.info("capturing a CUDA graph of %s", getattr(self.fn, "__name__", self.fn))
        self._static = [t.clone() for t in leaves]
        args = _with_tensors(args, self._static)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (allocator, cuBLAS/cuDNN plans) off the capture
            for _ in range(self.warmup):
                self.fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            self._out = self.fn(*args)
        self._graph, self._key = graph, key


def accelerate(fn: Callable[..., Any], *, compile: bool, cuda_graphs: bool, backend: str = "inductor",
               ) -> Callable[..., Any]:
    """fn, optionally compiled (fullgraph, static shapes), optionally replayed from a CUDA graph."""
    if compile:
        fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)
    if cuda_graphs:
        fn = CudaGraphed(fn)
    return fn
