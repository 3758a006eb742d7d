"""FLOPs of running some model code, attention included, on every device.

torch's `FlopCounterMode` counts matmuls and convolutions by formula, but it counts nothing for
scaled-dot-product attention on CPU (the CPU kernel has no formula registered): 27-54 % of the
DiT's FLOPs at this toolkit's sizes. `FlopCount` counts attention itself, from the shapes at each
`F.scaled_dot_product_attention` call: 2·Lq·Lk·D per head for Q·Kᵀ and 2·Lq·Lk·Dv for P·V (a mask
does not reduce it: the kernels compute every score). Whatever `FlopCounterMode` attributed to the
same call (CUDA's flash and efficient kernels, a math fallback's matmuls) is taken out again, so
nothing is counted twice and the figure does not depend on the device or the kernel chosen.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode


def attention_flops(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> int:
    """SDPA with q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv): 2·Lq·Lk·(D + Dv) per batch·head."""
    *batch, lq, d = q_shape
    lk, dv = k_shape[-2], v_shape[-1]
    n = 1
    for b in batch:
        n *= b
    return 2 * n * lq * lk * (d + dv)


class _AttentionCounter(TorchFunctionMode):
    def __init__(self, counter: FlopCounterMode):
        super().__init__()
        self.counter, self.attention, self.replaced = counter, 0, 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q = args[0] if args else kwargs["query"]
        k = args[1] if len(args) > 1 else kwargs["key"]
        v = args[2] if len(args) > 2 else kwargs["value"]
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        self.replaced += self.counter.get_total_flops() - before
        self.attention += attention_flops(tuple(q.shape), tuple(k.shape), tuple(v.shape))
        return out


class FlopCount:
    """`with FlopCount() as fc: ...` → `fc.total`, `fc.attention` (counted here), `fc.other`."""

    def __enter__(self) -> FlopCount:
        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()
        self._attn = _AttentionCounter(self._counter)
        self._attn.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._attn.__exit__(*exc)
        self._counter.__exit__(*exc)

    @property
    def attention(self) -> int:
        return self._attn.attention

    @property
    def other(self) -> int:
        """Everything but attention (linear layers, convolutions, ...), as FlopCounterMode counts it."""
        return self._counter.get_total_flops() - self._attn.replaced

    @property
    def total(self) -> int:
        return self.other + self.attention
