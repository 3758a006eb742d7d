"""`BlockKVCache`: preallocated self-attention K/V for streaming, with identity sinks (AHIS).

Layout per layer, in latent-frame slots of S tokens each:

    [ sinks: sink_frames | ring: window_frames | current block: block_frames ]

* Sinks are filled by the first blocks of a stream (the reference frame is latent 0 of block 0)
  and are never evicted: they hold the identity.
* The ring keeps the most recent `window_frames` frames. A committed block is written over the
  oldest ring block; nothing is moved to evict (ring index).
* The current block's K/V are written into the last segment at every denoising step, so one
  attention call covers the whole buffer with a validity mask: static shapes, no host syncs.

Keys are stored after the q/k RMSNorm but *before* RoPE. Each slot carries a temporal position
(a tensor), and RoPE is applied to all keys at attention time, so positions can be re-indexed
without rerunning the model. With `relative_rope` (default) positions are the slot's order within
the cache — sinks first, then the window oldest to newest, then the current block — so a stream
has no length limit. With `relative_rope=False` slots keep their absolute frame index, as
upstream-trained checkpoints expect.

Host state (how many sinks are filled, where the ring's oldest block is) is plain Python ints
that change only in `commit()`, once per block, outside the per-step path.

Legend: L layers, B batch, N = n_slots * S cache tokens, H heads, D head_dim, P = D // 2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from livetalk_cli.config import DiTConfig, StreamConfig
from livetalk_cli.models.attention import attention
from livetalk_cli.models.rope import Rope3D, apply_rope


class BlockKVCache:
    def __init__(
        self,
        dit: DiTConfig,
        stream: StreamConfig,
        grid_hw: tuple[int, int],
        *,
        batch: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        stream.validate()
        self.block_frames = stream.block_frames
        self.sink_frames = stream.sink_frames
        self.window_frames = stream.window_frames
        self.relative_rope = stream.relative_rope
        self.tokens_per_frame = grid_hw[0] * grid_hw[1]
        self.n_slots = self.sink_frames + self.window_frames + self.block_frames
        self.device = torch.device(device)
        self.rope = Rope3D(dit, grid_hw, device=self.device)

        n_tok = self.n_slots * self.tokens_per_frame
        shape = (dit.num_layers, batch, n_tok, dit.num_heads, dit.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=dtype)  # (L, B, N, H, D), pre-RoPE
        self.v = torch.zeros(shape, device=self.device, dtype=dtype)
        self.mask = torch.zeros(1, 1, 1, n_tok, device=self.device, dtype=torch.bool)
        self.key_cos = torch.zeros(n_tok, dit.head_dim // 2, device=self.device)
        self.key_sin = torch.zeros_like(self.key_cos)
        self._slot_abs = torch.zeros(self.n_slots, device=self.device, dtype=torch.long)
        self._slot_valid = torch.zeros(self.n_slots, device=self.device, dtype=torch.bool)
        cur0 = (self.sink_frames + self.window_frames) * self.tokens_per_frame
        self._cur = slice(cur0, n_tok)
        self.reset()

    # --- stream control (host side, once per block) --------------------------------------
    def reset(self) -> None:
        """Start a new stream. Stale K/V stay in memory but are masked out."""
        self.sinks_filled = 0  # frames
        self.ring_filled = 0  # blocks
        self.ring_next = 0  # ring block the next commit overwrites
        self.frames_done = 0  # absolute latent frames committed so far
        self._slot_valid.zero_()
        self._refresh()

    @property
    def ring_blocks(self) -> int:
        return self.window_frames // self.block_frames

    def commit(self) -> None:
        """Keep the current block (written by the t=0 refill) in the sinks or the ring."""
        bf = self.block_frames
        if self.sinks_filled < self.sink_frames:
            dest = self.sinks_filled
            self.sinks_filled += bf
        elif self.ring_blocks > 0:
            dest = self.sink_frames + self.ring_next * bf
            self.ring_next = (self.ring_next + 1) % self.ring_blocks
            self.ring_filled = min(self.ring_filled + 1, self.ring_blocks)
        else:
            dest = None  # no window: only the sinks are remembered
        if dest is not None:
            s = self.tokens_per_frame
            dst = slice(dest * s, (dest + bf) * s)
            self.k[:, :, dst].copy_(self.k[:, :, self._cur])
            self.v[:, :, dst].copy_(self.v[:, :, self._cur])
            self._slot_valid[dest : dest + bf] = True
            self._slot_abs[dest : dest + bf] = torch.arange(bf, device=self.device) + self.frames_done
        self.frames_done += bf
        self._refresh()

    def slot_positions(self) -> Tensor:
        """(n_slots,) temporal RoPE position of every slot (the current block's included)."""
        bf, dev = self.block_frames, self.device
        cur_slot = self.sink_frames + self.window_frames
        if not self.relative_rope:
            pos = self._slot_abs.clone()
            pos[cur_slot:] = torch.arange(bf, device=dev) + self.frames_done
            return pos
        pos = torch.zeros(self.n_slots, device=dev, dtype=torch.long)
        pos[: self.sink_frames] = torch.arange(self.sink_frames, device=dev)
        if self.ring_blocks:
            oldest = self.ring_next if self.ring_filled == self.ring_blocks else 0
            rank = (torch.arange(self.ring_blocks, device=dev) - oldest) % self.ring_blocks
            ring = self.sinks_filled + rank[:, None] * bf + torch.arange(bf, device=dev)[None]
            pos[self.sink_frames : cur_slot] = ring.reshape(-1)
        pos[cur_slot:] = self.sinks_filled + self.ring_filled * bf + torch.arange(bf, device=dev)
        return pos

    def _refresh(self) -> None:
        """Recompute RoPE tables and the validity mask after the slot layout changed."""
        cos, sin = self.rope.tables(self.slot_positions())
        self.key_cos.copy_(cos)
        self.key_sin.copy_(sin)
        valid = self._slot_valid.clone()
        valid[self.sink_frames + self.window_frames :] = True  # the current block
        self.mask.copy_(valid.repeat_interleave(self.tokens_per_frame).view(1, 1, 1, -1))

    # --- the per-step path (static shapes, no host syncs) --------------------------------
    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Self-attention of the current block over sinks + window + itself.

        q, k, v: (B, bf*S, H, D), k after RMSNorm and before RoPE. Returns (B, bf*S, H, D).
        """
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Training (DMD rollout exit step): the cached K/V are constants and the block's own
            # K/V are concatenated; the RoPE tables and mask are copied. Autograd then never saves
            # a tensor that a later refill or commit overwrites in place.
            past = self._cur.start
            k_all = torch.cat([self.k[layer][:, :past], k.to(self.k.dtype)], dim=1)
            v_all = torch.cat([self.v[layer][:, :past], v.to(self.v.dtype)], dim=1)
            cos, sin, mask = self.key_cos.clone(), self.key_sin.clone(), self.mask.clone()
        else:
            k_all, v_all = self.k[layer], self.v[layer]
            k_all[:, self._cur].copy_(k)
            v_all[:, self._cur].copy_(v)
            cos, sin, mask = self.key_cos, self.key_sin, self.mask
        q = apply_rope(q, cos[self._cur], sin[self._cur])
        return attention(q, apply_rope(k_all, cos, sin), v_all, mask)
