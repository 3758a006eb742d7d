"""Optional speed-ups for the block sampler's hot path: `torch.compile` and CUDA-graph replay.

Both rely on what `block_sampler` guarantees: static shapes, no host syncs, and a KV cache whose
tensors are updated in place (their addresses never change during a stream).

`CudaGraphed` captures one function call into a CUDA graph and replays it. Every tensor argument
(noise, conditioning, reference, pin) is copied into a static buffer before each replay, so callers
pass fresh tensors as usual; modules and the KV cache are captured by address. The returned tensor
is a copy of the graph's static output (the next replay overwrites that).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from livetalk_cli.errors import UserError
from livetalk_cli.models.dit import Conditioning

log = logging.getLogger(__name__)


def _flatten(obj: Any, out: list[Tensor]) -> Any:
    """Replace every tensor in args (through lists, tuples and Conditioning) by its index in `out`."""
    if isinstance(obj, Tensor):
        out.append(obj)
        return _Leaf(len(out) - 1)
    if isinstance(obj, Conditioning):
        return _Cond(_flatten(obj.text_kv, out), _flatten(obj.y, out), _flatten(obj.audio, out))
    if isinstance(obj, list | tuple):
        return type(obj)(_flatten(x, out) for x in obj)
    return obj  # modules, the KV cache, None: used by address


def _unflatten(tree: Any, leaves: list[Tensor]) -> Any:
    if isinstance(tree, _Leaf):
        return leaves[tree.index]
    if isinstance(tree, _Cond):
        return Conditioning(_unflatten(tree.text_kv, leaves), _unflatten(tree.y, leaves),
                            _unflatten(tree.audio, leaves))
    if isinstance(tree, list | tuple):
        return type(tree)(_unflatten(x, leaves) for x in tree)
    return tree


@dataclasses.dataclass(frozen=True)
class _Leaf:
    index: int


@dataclasses.dataclass(frozen=True)
class _Cond:
    text_kv: Any
    y: Any
    audio: Any


def _structure(tree: Any) -> Any:
    """The argument structure: tensor slots by index, other objects (modules, the cache) by identity."""
    if isinstance(tree, _Leaf):
        return ("tensor", tree.index)
    if isinstance(tree, _Cond):
        return ("cond", _structure(tree.text_kv), _structure(tree.y), _structure(tree.audio))
    if isinstance(tree, list | tuple):
        return (type(tree).__name__, *(_structure(x) for x in tree))
    return ("object", id(tree))


def _signature(tree: Any, leaves: list[Tensor]) -> tuple:
    return (_structure(tree), tuple((t.shape, t.dtype, t.device) for t in leaves))


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
        leaves: list[Tensor] = []
        tree = _flatten(args, leaves)
        if not leaves or leaves[0].device.type != "cuda":
            raise UserError("CUDA graphs need the model on a CUDA device (--device cuda)")
        key = _signature(tree, leaves)
        if key != self._key:
            self._capture(tree, leaves, key)
        else:
            for dst, src in zip(self._static, leaves, strict=True):
                dst.copy_(src)
        assert self._graph is not None
        self._graph.replay()
        return self._out.clone() if isinstance(self._out, Tensor) else self._out  # next replay overwrites

    def _capture(self, tree: Any, leaves: list[Tensor], key: tuple) -> None:
        log.info("capturing a CUDA graph of %s", getattr(self.fn, "__name__", self.fn))
        self._static = [t.clone() for t in leaves]
        args = _unflatten(tree, self._static)
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
