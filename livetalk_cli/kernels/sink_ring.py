"""`livetalk::sink_ring_attention`: a block's self-attention over [identity sinks | ring | itself].

The operator the csrc kernel implements (csrc/, built by setup.py on a CUDA machine):

    out = softmax(rope(q) · [K_sinks | K_ring | rope(k)]ᵀ / √D) · [V_sinks | V_ring | v]

q, k, v: (B, Nb, H, D) the block's queries, keys and values before RoPE; k_cache, v_cache:
(B, Np, H, D) one layer of `BlockKVCache` ([sinks: sink_cap tokens | ring: Np - sink_cap tokens]),
keys already rotated at their temporal positions; cos, sin: (Nb, D/2) fp32 RoPE tables of the
block; seg: int32 (2,) on q's device = [valid sink tokens, valid ring tokens]. Valid slots are a
prefix of each segment: the cache fills the sinks and then the ring from slot 0, and a full ring
is valid everywhere, so two lengths describe every state and no mask is read. The ring's order does
not matter to the result (its keys carry their positions already): the ring index lives in
`BlockKVCache.commit`, which writes a block over the oldest one in place.

The implementation registered here (every device) is the reference: SDPA over the gathered valid
segments. The csrc extension registers the fused CUDA kernel for bf16/fp16 under the CUDA key;
`register_fake` gives shapes to torch.export / AOTInductor (which then call the op), and under
`torch.onnx.export` `onnx_node` emits a typed `livetalk::SinkRingAttention` node (the input the
TensorRT plugin in csrc/trt implements).

Legend: B batch, Nb block tokens, Np cached tokens, H heads, D head_dim.
"""

from __future__ import annotations

import importlib
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from livetalk_cli.models.rope import apply_rope

log = logging.getLogger(__name__)

ONNX_OP = "livetalk::SinkRingAttention"
KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # what the CUDA kernel takes (fp32 accumulation)
KERNEL_HEAD_DIMS = (32, 64, 128)


def check_args(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor,
               seg: Tensor, sink_cap: int) -> None:
    """Shapes and dtypes, one line each (also run by the fake implementation, so exports check them)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"sink_ring_attention: q, k, v must be (B, Nb, H, D) alike, got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    b, nb, h, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or (k_cache.shape[0], *k_cache.shape[2:]) != (b, h, d):
        raise ValueError(f"sink_ring_attention: k_cache, v_cache must be (B, Np, H, D) = ({b}, Np, {h}, {d}), "
                         f"got {list(k_cache.shape)}, {list(v_cache.shape)}")
    if not 0 <= sink_cap <= k_cache.shape[1]:
        raise ValueError(f"sink_ring_attention: sink_cap {sink_cap} outside the cache's {k_cache.shape[1]} tokens")
    if tuple(cos.shape) != (nb, d // 2) or cos.shape != sin.shape or cos.dtype != torch.float32 or d % 2:
        raise ValueError(f"sink_ring_attention: cos, sin must be float32 ({nb}, {d // 2}), "
                         f"got {cos.dtype}{list(cos.shape)}")
    if tuple(seg.shape) != (2,) or seg.dtype != torch.int32:
        raise ValueError(f"sink_ring_attention: seg must be int32 (2,), got {seg.dtype}{list(seg.shape)}")
    dtypes = {q.dtype, k.dtype, v.dtype, k_cache.dtype, v_cache.dtype}
    if len(dtypes) != 1:
        raise ValueError(f"sink_ring_attention: q, k, v and the cache must share a dtype, "
                         f"got {sorted(map(str, dtypes))}")


def gathered_reference(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor,
                       sin: Tensor, seg: Tensor, sink_cap: int) -> Tensor:
    """SDPA over the valid segments gathered into one key sequence (reads `seg` on the host)."""
    n_sink, n_ring = (int(x) for x in seg.tolist())
    if not (0 <= n_sink <= sink_cap and 0 <= n_ring <= k_cache.shape[1] - sink_cap):
        raise ValueError(f"sink_ring_attention: seg {[n_sink, n_ring]} outside [0, {sink_cap}] x "
                         f"[0, {k_cache.shape[1] - sink_cap}]")
    ring = slice(sink_cap, sink_cap + n_ring)
    keys = torch.cat([k_cache[:, :n_sink], k_cache[:, ring], apply_rope(k, cos, sin)], dim=1)
    values = torch.cat([v_cache[:, :n_sink], v_cache[:, ring], v], dim=1)
    out = F.scaled_dot_product_attention(apply_rope(q, cos, sin).transpose(1, 2), keys.transpose(1, 2),
                                         values.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


@torch.library.custom_op("livetalk::sink_ring_attention", mutates_args=())
def sink_ring_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor,
                        sin: Tensor, seg: Tensor, sink_cap: int) -> Tensor:
    check_args(q, k, v, k_cache, v_cache, cos, sin, seg, sink_cap)
    return gathered_reference(q, k, v, k_cache, v_cache, cos, sin, seg, sink_cap)


@sink_ring_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor,
      seg: Tensor, sink_cap: int) -> Tensor:
    check_args(q, k, v, k_cache, v_cache, cos, sin, seg, sink_cap)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def onnx_node(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor,
              seg: Tensor, sink_cap: int) -> Tensor:
    """The op as one typed custom-domain ONNX node (inputs in the op's order, sink_cap an attribute)."""
    return torch.onnx.ops.symbolic(ONNX_OP, (q, k, v, k_cache, v_cache, cos, sin, seg), {"sink_cap": sink_cap},
                                   dtype=q.dtype, shape=q.shape, version=1)


def segments(mask: Tensor, sink_tokens: int, past_tokens: int) -> Tensor:
    """`seg` from a window's validity mask (…, Np + Nb): valid sink and ring tokens, int32 (2,).
    Tensor ops only (no host sync), so exported graphs compute it from their mask input."""
    m = mask.reshape(-1)
    return torch.stack([m[:sink_tokens].sum(), m[sink_tokens:past_tokens].sum()]).to(torch.int32)


_extension: bool | None = None


def cuda_kernel_available() -> bool:
    """Whether the csrc extension is built and loaded (it registers the CUDA kernel on import)."""
    global _extension
    if _extension is None:
        try:
            importlib.import_module("livetalk_cli._csrc")
            _extension = True
        except ImportError as e:  # a CPU install, or a build without CUDA: the reference runs everywhere
            log.debug("csrc extension not loaded: %s", e)
            _extension = False
    return _extension


def check_backend_name(name: str) -> None:
    """--attention's name (checked before anything loads; whether the kernel can run, after)."""
    from livetalk_cli.errors import UserError
    from livetalk_cli.models.attention import ATTENTION_BACKENDS

    if name not in ATTENTION_BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """--attention → the backend a stream runs. "auto": the csrc kernel on CUDA where it is built
    and takes the dtype and head dim, SDPA elsewhere. "csrc" on CUDA insists on the kernel (one
    line if it cannot run); on CPU it runs the op's reference (what exports and tests use)."""
    from livetalk_cli.errors import UserError

    check_backend_name(name)
    fits = dtype in KERNEL_DTYPES and head_dim in KERNEL_HEAD_DIMS
    if name == "auto":
        return "csrc" if device.type == "cuda" and fits and cuda_kernel_available() else "sdpa"
    if name == "csrc" and device.type == "cuda":
        if not cuda_kernel_available():
            raise UserError("--attention csrc: the csrc extension is not built (pip install --no-build-isolation -e . "
                            "on a machine with a CUDA torch and toolkit builds it)")
        if not fits:
            raise UserError(f"--attention csrc: the kernel takes bf16/fp16 and head dims {KERNEL_HEAD_DIMS}, "
                            f"not {str(dtype).removeprefix('torch.')} x {head_dim}")
    return name


cuda_kernel_available()  # register the CUDA kernel wherever the extension is built
