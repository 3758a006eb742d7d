"""The umT5 encoder in Wan's own module layout, so Wan's `models_t5_umt5-xxl-enc-bf16.pth` loads as
downloaded (LiveTalk and OmniAvatar ship the same file).

Key names (Wan's `T5Encoder` with `shared_pos=False`): `token_embedding.weight`, per block i
`blocks.i.norm1.weight`, `blocks.i.attn.{q,k,v,o}.weight`, `blocks.i.norm2.weight`,
`blocks.i.ffn.gate.0.weight`, `blocks.i.ffn.fc1.weight`, `blocks.i.ffn.fc2.weight`,
`blocks.i.pos_embedding.embedding.weight` (a relative-position bias per block), then `norm.weight`.
The math is umT5's: RMS norms without mean or bias (eps 1e-6), attention without 1/sqrt(d) scaling
plus the block's bucketed relative-position bias (bidirectional, max distance 128; umt5-xxl has
32 buckets),
a gated tanh-GELU feed-forward, and the padding masked out of the keys. The sizes are read from the
file's tensor shapes (umt5-xxl: 24 blocks, 4096 wide, 64 heads, 10240 feed-forward, 256384 tokens).

Loading is memory-frugal: the module is built on the meta device and takes the file's tensors
(memory-mapped, `weights_only`) by assignment, so the 5.7B-parameter encoder is never in RAM twice.

Legend: B prompts, L tokens, C width, H heads, K buckets.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from livetalk_cli.errors import CheckpointError

MAX_DISTANCE = 128  # Wan's (and umT5's) relative-position horizon
EPS = 1e-6


@dataclass(frozen=True)
class UMT5Size:
    vocab: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int = 32


def relative_buckets(lq: int, lk: int, num_buckets: int, device: torch.device | str) -> Tensor:
    """(Lq, Lk) bucket of key position j relative to query position i (bidirectional T5 buckets)."""
    rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(MAX_DISTANCE / exact)
                     * (half - exact)).long()
    return buckets + torch.where(rel < exact, rel, large.clamp(max=half - 1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)
        return self.weight * y.to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x: (B, L, C); bias: (B, H, L, L) position bias + padding mask (additive)."""
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = q.float() @ k.float().transpose(-1, -2) + bias  # no 1/sqrt(d): T5's scaling is in the weights
        out = scores.softmax(-1).to(v.dtype) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class RelativeBias(nn.Module):
    def __init__(self, buckets: int, heads: int):
        super().__init__()
        self.embedding = nn.Embedding(buckets, heads)

    def forward(self, length: int) -> Tensor:
        """(1, H, L, L) float32."""
        w = self.embedding.weight
        return self.embedding(relative_buckets(length, length, w.shape[0], w.device)).permute(2, 0, 1)[None].float()


class Block(nn.Module):
    def __init__(self, size: UMT5Size):
        super().__init__()
        self.norm1 = RMSNorm(size.dim)
        self.attn = Attention(size.dim, size.dim_attn, size.num_heads)
        self.norm2 = RMSNorm(size.dim)
        self.ffn = FeedForward(size.dim, size.dim_ffn)
        self.pos_embedding = RelativeBias(size.num_buckets, size.num_heads)

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), self.pos_embedding(x.shape[1]) + pad)
        return x + self.ffn(self.norm2(x))


class WanUMT5Encoder(nn.Module):
    """umT5's encoder under Wan's key names. forward(ids, mask) → (B, L, C) last hidden states."""

    def __init__(self, size: UMT5Size):
        super().__init__()
        self.size = size
        self.token_embedding = nn.Embedding(size.vocab, size.dim)
        self.blocks = nn.ModuleList([Block(size) for _ in range(size.num_layers)])
        self.norm = RMSNorm(size.dim)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask: (B, L) int; mask 1 on real tokens. Padding is masked out of every key."""
        x = self.token_embedding(ids)
        pad = torch.zeros(mask.shape, device=ids.device).masked_fill(mask == 0, torch.finfo(torch.float32).min)
        pad = pad[:, None, None, :]  # (B, 1, 1, L)
        for block in self.blocks:
            x = block(x, pad)
        return self.norm(x)


_BLOCK = re.compile(r"blocks\.(\d+)\.")


def size_of(sd: dict[str, Tensor], where: Path) -> UMT5Size:
    """The encoder's sizes from Wan-layout tensor shapes (one line naming what is missing)."""
    need = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
            "blocks.0.pos_embedding.embedding.weight", "norm.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"{where} is not a Wan umT5 encoder (missing {', '.join(missing)}; its keys begin "
                              f"{', '.join(list(sd)[:3])})")
    vocab, dim = sd["token_embedding.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    return UMT5Size(vocab=vocab, dim=dim, dim_attn=sd["blocks.0.attn.q.weight"].shape[0],
                    dim_ffn=sd["blocks.0.ffn.fc1.weight"].shape[0], num_heads=heads, num_layers=layers,
                    num_buckets=buckets)


def load_wan_umt5(path: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                  ) -> WanUMT5Encoder:
    """Wan's `.pth` (a plain state dict) → the encoder, built on the meta device and assigned the
    memory-mapped tensors (cast to `dtype` and moved to `device` one tensor at a time)."""
    from livetalk_cli.checkpoint import check_keys

    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read umT5 weights {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict")
    with torch.device("meta"):
        model = WanUMT5Encoder(size_of(sd, path))
    check_keys(model, sd, f"umT5 encoder {path}")
    sd = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
          for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    return model.eval().requires_grad_(False)
