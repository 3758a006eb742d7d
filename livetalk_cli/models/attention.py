"""Attention behind one function, and the self-attention contexts the DiT runs under.

The DiT never decides where its keys come from: each self-attention call goes through a
`SelfAttention` context. `SequenceAttention` attends within the tokens of the current forward
(bidirectional teacher, or block-causal training/reference with a mask); `WindowAttention`
attends over a `KVWindow` — the cached identity sinks + ring window that `BlockKVCache`
(sampling/kv_cache.py) owns — plus the block being denoised, and hands back the block's own K/V.

Legend: B batch, L tokens, H heads, D head_dim, F latent frames, S tokens per frame,
Np cached (past) tokens, Nb tokens of the block, NL layers, P = D // 2.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from livetalk_cli.models.rope import apply_rope

ATTENTION_BACKENDS = ("auto", "sdpa", "csrc", "flex")  # for the cached window (`WindowAttention`)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention (reference backend: SDPA).

    q: (B, Lq, H, D), k/v: (B, Lk, H, D); mask: bool, True = may attend, broadcastable to
    (B, H, Lq, Lk). Returns (B, Lq, H, D).
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


class SelfAttention(Protocol):
    """Where a DiT layer's self-attention gets its keys and positions."""

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v: (B, L, H, D) for this forward's tokens, before RoPE. Returns (B, L, H, D)."""
        ...


class SequenceAttention:
    """Attention among this forward's own tokens (no cache), optional boolean token mask."""

    def __init__(self, cos: Tensor, sin: Tensor, mask: Tensor | None = None):
        self.cos, self.sin, self.mask = cos, sin, mask

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin), v, self.mask)


def block_causal_frame_mask(
    num_frames: int,
    block_frames: int,
    *,
    sink_frames: int | None = None,
    window_frames: int | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Frame-level mask (F, F), True = query frame may attend key frame.

    Block-causal: a frame sees every frame of its own block and of earlier blocks. With
    `window_frames` set, earlier blocks are limited to the identity sinks (the first
    `sink_frames` frames) and the `window_frames` frames just before the query's block — the
    same set the streaming KV cache holds.
    """
    idx = torch.arange(num_frames, device=device)
    block_start = idx // block_frames * block_frames  # (F,)
    q_start = block_start[:, None]
    k = idx[None, :]
    allowed = k < q_start + block_frames
    if window_frames is not None:
        sinks = k < (sink_frames or 0)
        recent = k >= q_start - window_frames
        allowed &= sinks | recent
    return allowed


def expand_frame_mask(frame_mask: Tensor, tokens_per_frame: int) -> Tensor:
    """(Fq, Fk) frame mask → (Fq*S, Fk*S) token mask."""
    s = tokens_per_frame
    return frame_mask.repeat_interleave(s, dim=0).repeat_interleave(s, dim=1)


@dataclass(frozen=True, eq=False)
class KVWindow:
    """The cache side of the engine contract: what one DiT pass of a block reads.

    k, v: (NL, B, Np, H, D) the past window ([sinks | ring]); keys are already rotated at their
    temporal positions (RoPE is applied once, when a block is committed). cos, sin: (Nb, P) fp32
    RoPE tables of the block being denoised (its queries and its own keys). mask: (1, 1, 1, Np + Nb)
    bool, True = may attend, or None once every slot holds a committed frame (so SDPA may take its
    unmasked kernels). Static shapes: the same tensors, updated in place, for a whole stream.
    backend: the attention backend (`ATTENTION_BACKENDS`, resolved: not "auto"); sink_tokens: the
    sinks' capacity, where the ring starts; seg: int32 (2,) valid sink and ring tokens (the
    `livetalk::sink_ring_attention` op's input; None: computed from the mask).
    """

    k: Tensor
    v: Tensor
    cos: Tensor
    sin: Tensor
    mask: Tensor | None
    backend: str = "sdpa"
    sink_tokens: int = 0
    seg: Tensor | None = None


class WindowAttention:
    """Self-attention of a block over a `KVWindow` plus the block itself (the engine contract).

    Never writes into the window: with `keep_kv` it collects each layer's new K (after the q/k
    norm, before RoPE) and V, which `BlockKVCache.commit` stores between passes.

    Backends (`KVWindow.backend`): "sdpa" concatenates [window | block] and runs SDPA under the
    validity mask; "csrc" calls `livetalk::sink_ring_attention` (the fused CUDA kernel where the
    extension is built, its gathered-segments reference elsewhere; inference only: when autograd
    needs the block's gradients it runs SDPA); "flex" runs FlexAttention with a block mask from the validity mask.
    """

    def __init__(self, window: KVWindow, keep_kv: bool = False):
        self.window, self.keep_kv = window, keep_kv
        self.new_k: list[Tensor] = []
        self.new_v: list[Tensor] = []
        self._shared: Tensor | object | None = None  # per pass, all layers: csrc's seg / flex's block mask

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        w = self.window
        cos, sin, mask = w.cos, w.sin, w.mask
        if self.keep_kv:
            self.new_k.append(k)
            self.new_v.append(v)
        grad = torch.is_grad_enabled()
        if w.backend == "csrc" and not (grad and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return self._csrc(layer, q, k, v)
        if grad:  # training: autograd must not save tensors a commit overwrites
            cos, sin = cos.clone(), sin.clone()
            mask = None if mask is None else mask.clone()
        k_all = torch.cat([w.k[layer], apply_rope(k, cos, sin).to(w.k.dtype)], dim=1)
        v_all = torch.cat([w.v[layer], v.to(w.v.dtype)], dim=1)
        q = apply_rope(q, cos, sin)
        if w.backend == "flex" and mask is not None:
            return self._flex(q, k_all, v_all, mask)
        return attention(q, k_all, v_all, mask)

    def block_kv(self) -> tuple[Tensor, Tensor]:
        """(NL, B, Nb, H, D) pre-RoPE keys and values of the block, one layer after another."""
        return torch.stack(self.new_k), torch.stack(self.new_v)

    def _csrc(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from livetalk_cli.kernels import sink_ring

        w = self.window
        if self._shared is None:  # the cache's seg; an exported graph's window has only its mask input
            assert w.seg is not None or w.mask is not None, "a csrc window needs seg or its mask"
            self._shared = w.seg if w.seg is not None else sink_ring.segments(w.mask, w.sink_tokens, w.k.shape[2])
        seg = self._shared
        assert isinstance(seg, Tensor)
        args = (q, k.to(w.k.dtype), v.to(w.v.dtype), w.k[layer], w.v[layer], w.cos, w.sin, seg, w.sink_tokens)
        if torch.onnx.is_in_onnx_export():
            return sink_ring.onnx_node(*args)
        return torch.ops.livetalk.sink_ring_attention(*args)

    def _flex(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if self._shared is None:
            valid = mask.reshape(-1)

            def may_attend(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return valid[kv_idx]

            self._shared = create_block_mask(may_attend, None, None, q.shape[1], k.shape[1], device=q.device)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if q.device.type == "cuda":  # FlexAttention's fused kernels come from torch.compile
            out = _compiled_flex()(q, k, v, block_mask=self._shared)
        else:  # CPU: its unfused eager path (the backend exists for GPU comparisons and training masks)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
                out = flex_attention(q, k, v, block_mask=self._shared)
        assert isinstance(out, Tensor)
        return out.transpose(1, 2)


@functools.cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
