"""`BlockKVCache`: preallocated self-attention K/V for streaming, with identity sinks (AHIS).

Layout per layer, in latent-frame slots of S tokens each (the window a DiT pass reads):

    [ sinks: sink_frames | ring: window_frames ]      + the block being denoised (pass input)

* Sinks are filled by the first blocks of a stream (the reference frame is latent 0 of block 0)
  and are never evicted: they hold the identity.
* The ring keeps the most recent `window_frames` frames. A committed block is written over the
  oldest ring block; nothing is moved to evict (ring index).
* A pass attends over sinks + ring + its own block: `sink_frames + window_frames + block_frames`
  latent frames when the cache is full (LiveTalk's presets: 9 + 3 + 3 = 15).

The cache never runs inside a pass. A pass reads `window()` (a `KVWindow`: the buffers, the
block's RoPE tables, the validity mask) and returns the block's K/V; `commit(k, v)` stores them
between passes. Keys are stored rotated: RoPE is applied once, at commit, not on every pass.
With `relative_rope=False` every slot keeps its absolute frame index (upstream checkpoints:
Self Forcing / LiveTalk), so a key is rotated exactly once. With `relative_rope` positions are the
slot's order in the cache — sinks first, then the ring oldest to newest, then the block — so a
stream has no length limit; once the ring wraps every commit shifts the ring's positions, and the
ring is re-rotated from a copy of its pre-RoPE keys (the ring only; sinks never move).

Host state (sinks filled, ring index, positions) is plain Python that changes only in `commit()`,
once per block, outside the per-step path; the per-step path has static shapes and no host syncs.

Legend: NL layers, B batch, Np = (sink_frames + window_frames) * S cached tokens, Nb block tokens,
H heads, D head_dim, P = D // 2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from livetalk_cli.config import DiTConfig, StreamConfig
from livetalk_cli.models.attention import KVWindow
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
        attention: str = "sdpa",
    ):
        """attention: the window's backend (resolved, see `kernels.sink_ring.resolve_backend`)."""
        stream.validate()
        self.block_frames = stream.block_frames
        self.sink_frames = stream.sink_frames
        self.window_frames = stream.window_frames
        self.relative_rope = stream.relative_rope
        self.tokens_per_frame = s = grid_hw[0] * grid_hw[1]
        self.past_slots = self.sink_frames + self.window_frames
        self.device = torch.device(device)
        self.rope = Rope3D(dit, grid_hw, device=self.device)

        shape = (dit.num_layers, batch, self.past_slots * s, dit.num_heads, dit.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=dtype)  # (NL, B, Np, H, D), rotated
        self.v = torch.zeros(shape, device=self.device, dtype=dtype)
        # relative positions move once the ring wraps: keep the ring's keys before RoPE too
        self.k_ring_raw = None
        if self.relative_rope and self.window_frames:
            raw_shape = (dit.num_layers, batch, self.window_frames * s, dit.num_heads, dit.head_dim)
            self.k_ring_raw = torch.zeros(raw_shape, device=self.device, dtype=dtype)
        n_blk = self.block_frames * s
        self.cos = torch.zeros(n_blk, dit.head_dim // 2, device=self.device)  # the block's tables
        self.sin = torch.zeros_like(self.cos)
        self.mask = torch.zeros(1, 1, 1, self.past_slots * s + n_blk, device=self.device, dtype=torch.bool)
        self.seg = torch.zeros(2, device=self.device, dtype=torch.int32)  # valid sink, ring tokens
        layout = dict(backend=attention, sink_tokens=self.sink_frames * s, seg=self.seg)
        self._masked = KVWindow(self.k, self.v, self.cos, self.sin, self.mask, **layout)
        self._full = KVWindow(self.k, self.v, self.cos, self.sin, None, **layout)
        self.reset()

    # --- host bookkeeping (once per block) ----------------------------------------------
    def reset(self) -> None:
        """Start a new stream. Stale K/V stay in memory but are masked out."""
        self.sinks_filled = 0  # frames
        self.ring_filled = 0  # blocks
        self.ring_next = 0  # ring block the next commit overwrites
        self.frames_done = 0  # absolute latent frames committed so far
        self._valid = [False] * self.past_slots
        self._abs = [0] * self.past_slots  # absolute frame index held by each slot
        self._refresh()

    @property
    def ring_blocks(self) -> int:
        return self.window_frames // self.block_frames

    @property
    def full(self) -> bool:
        """Every slot of the window holds a committed frame (the mask is then dropped)."""
        return all(self._valid)

    def window(self) -> KVWindow:
        """What the next pass reads: the same buffers all stream long; no mask once full."""
        return self._full if self.full else self._masked

    def commit(self, k: Tensor, v: Tensor) -> None:
        """Keep the block the t = 0 refill just produced in the sinks or the ring.

        k, v: (NL, B, Nb, H, D), keys after the q/k norm and before RoPE (`WindowAttention`).
        """
        bf, s = self.block_frames, self.tokens_per_frame
        wrapped = False  # the block evicts a ring block: with relative positions the whole ring moves
        if self.sinks_filled < self.sink_frames:
            dest = self.sinks_filled
            self.sinks_filled += bf
        elif self.ring_blocks > 0:
            dest = self.sink_frames + self.ring_next * bf
            wrapped = self.ring_filled == self.ring_blocks
            self.ring_next = (self.ring_next + 1) % self.ring_blocks
            self.ring_filled = min(self.ring_filled + 1, self.ring_blocks)
        else:
            dest = None  # no window: only the sinks are remembered
        if dest is not None:
            dst = slice(dest * s, (dest + bf) * s)
            self.v[:, :, dst].copy_(v)
            if self.k_ring_raw is not None and dest >= self.sink_frames:
                r0 = (dest - self.sink_frames) * s
                self.k_ring_raw[:, :, r0: r0 + bf * s].copy_(k)
            if self.k_ring_raw is not None and wrapped:
                self._rotate_ring()  # the new block included
            else:  # its position is final: rotated once, at the tables its passes used
                self.k[:, :, dst].copy_(apply_rope(k, self.cos, self.sin))
            for j in range(bf):
                self._valid[dest + j] = True
                self._abs[dest + j] = self.frames_done + j
        self.frames_done += bf
        self._refresh()

    def slot_positions(self) -> list[int]:
        """Temporal RoPE position of every window slot, then of the block's frames."""
        past = list(self._abs)
        if self.relative_rope:
            past[: self.sink_frames] = range(self.sink_frames)
            oldest = self.ring_next if self.ring_filled == self.ring_blocks else 0
            for b in range(self.ring_blocks):
                rank = (b - oldest) % self.ring_blocks
                for j in range(self.block_frames):
                    past[self.sink_frames + b * self.block_frames + j] = (
                        self.sinks_filled + rank * self.block_frames + j)
        return past + self._block_positions()

    def _block_positions(self) -> list[int]:
        base = self.sinks_filled + self.ring_filled * self.block_frames if self.relative_rope else self.frames_done
        return [base + j for j in range(self.block_frames)]

    def _rotate_ring(self) -> None:
        """Relative positions after the ring wrapped: rotate every ring key at its new position
        (oldest block first, after the sinks), from the ring's pre-RoPE copy."""
        assert self.k_ring_raw is not None
        pos = self.slot_positions()[self.sink_frames: self.past_slots]
        cos, sin = self.rope.tables(torch.tensor(pos, device=self.device))
        self.k[:, :, self.sink_frames * self.tokens_per_frame:].copy_(apply_rope(self.k_ring_raw, cos, sin))

    def _refresh(self) -> None:
        """The block's RoPE tables and the validity mask for the next passes."""
        cos, sin = self.rope.tables(torch.tensor(self._block_positions(), device=self.device))
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        valid = torch.tensor(self._valid + [True] * self.block_frames, device=self.device)
        self.mask.copy_(valid.repeat_interleave(self.tokens_per_frame).view(1, 1, 1, -1))
        s = self.tokens_per_frame
        seg = [self.sinks_filled * s, self.ring_filled * self.block_frames * s]
        self.seg.copy_(torch.tensor(seg, dtype=torch.int32))
