"""Wan2.1 DiT with OmniAvatar conditioning, one timestep per latent frame.

Parameter names are Wan's own (`blocks.N.self_attn.q`, `head.head`, `audio_proj.proj`, ...), so
an original checkpoint loads by name. Math follows REFERENCE §2/§4: modulation, LayerNorms without
affine, RMSNorm on q/k over the full dim, unmasked cross-attention, GELU(tanh) FFN, head modulation.

fp32 islands (marked `# fp32`): time embedding, modulation, norms, RoPE. The residual stream is
kept in fp32; linear layers run in the parameters' dtype.

Legend: B batch, F latent frames, S tokens per frame (h*w after patching), D model dim,
H heads, Dh head dim, Lt text tokens, C latent channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from livetalk_cli.config import DiTConfig
from livetalk_cli.models.attention import SelfAttention, SequenceAttention, attention


def sinusoidal_embedding(dim: int, t: Tensor) -> Tensor:
    """t: (N,) timesteps in [0, 1000] → (N, dim) as [cos | sin]. fp32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # fp32
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32, returns fp32 (the residual stream's dtype)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class _Projections(nn.Module):
    """q, k, v, o linears and RMSNorm on q and k over the full dim (Wan's attention layers)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(d, cfg.eps), RMSNorm(d, cfg.eps)


class SelfAttn(_Projections):
    def forward(self, x: Tensor, layer: int, attn: SelfAttention) -> Tensor:
        """x: (B, L, D) in the weights' dtype → (B, L, D)."""
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, -1)
        k = self.norm_k(self.k(x)).view(b, n, self.num_heads, -1)
        v = self.v(x).view(b, n, self.num_heads, -1)
        return self.o(attn(layer, q, k, v).flatten(2))


class CrossAttn(_Projections):
    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """context: (B, Lt, D) embedded text → k, v (B, Lt, H, Dh). Computed once per prompt."""
        b, n, _ = context.shape
        k = self.norm_k(self.k(context)).view(b, n, self.num_heads, -1)
        v = self.v(context).view(b, n, self.num_heads, -1)
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, -1)
        return self.o(attention(q, kv[0], kv[1]).flatten(2))  # text padding is not masked (Wan)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm32(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttn(cfg)
        self.norm3 = LayerNorm32(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttn(cfg)
        self.norm2 = LayerNorm32(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(
        self, x: Tensor, e: Tensor, text_kv: tuple[Tensor, Tensor], layer: int, attn: SelfAttention
    ) -> Tensor:
        """x: (B, F, S, D) fp32 residual stream; e: (B, F, 6, D) fp32 time projection."""
        b, f, s, d = x.shape
        mod = (self.modulation.float() + e).unsqueeze(3)  # fp32 (B, F, 6, 1, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)
        dtype = self.ffn[0].weight.dtype

        h = (self.norm1(x) * (1 + scale1) + shift1).to(dtype)
        x = x + gate1 * self.self_attn(h.view(b, f * s, d), layer, attn).view(b, f, s, d).float()
        h = self.norm3(x).to(dtype).view(b, f * s, d)
        x = x + self.cross_attn(h, text_kv).view(b, f, s, d).float()
        h = (self.norm2(x) * (1 + scale2) + shift2).to(dtype)
        x = x + gate2 * self.ffn(h).float()
        return x


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        """x: (B, F, S, D) fp32, t_emb: (B, F, D) fp32 → (B, F, S, out*prod(patch))."""
        shift, scale = (self.modulation.float() + t_emb.unsqueeze(2)).unsqueeze(3).unbind(2)
        return self.head((self.norm(x) * (1 + scale) + shift).to(self.head.weight.dtype))


class AudioPack(nn.Module):
    """OmniAvatar: `audio_pack_frames` video frames of features → one vector per latent frame."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        assert cfg.audio_dim is not None
        self.proj = nn.Linear(cfg.audio_pack_frames * cfg.audio_dim, cfg.audio_hidden)
        self.norm_out = nn.LayerNorm(cfg.audio_hidden)

    def forward(self, packed: Tensor) -> Tensor:
        """packed: (B, F, pack*A) time-major → (B, F, audio_hidden)."""
        return self.norm_out(self.proj(packed))


def pack_audio_frames(feats: Tensor, *, stream_start: bool, pack: int = 4) -> Tensor:
    """Per-video-frame features → the packed layout AudioPack reads.

    feats: (B, T, A) features of the video frames a run of latent frames decodes to. At the
    start of a stream the first latent frame decodes to one video frame, so (as OmniAvatar does)
    `pack - 1` copies of the first frame are prepended. Returns (B, T'/pack, pack*A).
    """
    if stream_start:
        feats = torch.cat([feats[:, :1].expand(-1, pack - 1, -1), feats], dim=1)
    b, t, a = feats.shape
    if t % pack:
        raise ValueError(f"{t} audio frames do not pack into groups of {pack}")
    return feats.reshape(b, t // pack, pack * a)


@dataclass
class Conditioning:
    """Everything besides the noisy latents that a forward needs, prepared once per prompt/block.

    text_kv: per layer (k, v) of the prompt, each (B, Lt, H, Dh) — `WanDiT.prepare_text`.
    y: (B, C+1, F, h, w) reference latent + mask channels, or None (T2V).
    audio: (num_audio_layers, B, F, D) per-latent-frame audio projections, or None.
    """

    text_kv: list[tuple[Tensor, Tensor]]
    y: Tensor | None = None
    audio: Tensor | None = None


# A pytree node: torch.compile, torch.export and CUDA-graph capture see its tensors as inputs.
torch.export.register_dataclass(Conditioning)


class WanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        # Training on long sequences: each block's activations are recomputed in the backward pass
        # instead of kept (torch.utils.checkpoint). Only for `SequenceAttention` passes: a KV-cache
        # pass reads a cache that later commits overwrite, so a recompute would see other values.
        self.grad_checkpointing = False
        if cfg.has_audio:
            self.audio_proj = AudioPack(cfg)
            self.audio_cond_projs = nn.ModuleList(
                [nn.Linear(cfg.audio_hidden, d) for _ in range(cfg.num_audio_layers)]
            )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Wan's init: Xavier linears, zero biases, normal(0.02) embeddings, zero output head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # --- prepared once per prompt / per block ---------------------------------------------
    def prepare_text(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        """context: (B, Lt, text_dim) from a text encoder → per-layer cross-attention (k, v)."""
        dtype = self.text_embedding[0].weight.dtype
        emb = self.text_embedding(context.to(dtype))
        return [blk.cross_attn.context_kv(emb) for blk in self.blocks]

    def prepare_audio(self, packed: Tensor) -> Tensor:
        """packed: (B, F, pack*A) → (num_audio_layers, B, F, D) audio added per latent frame."""
        a = self.audio_proj(packed.to(self.audio_proj.proj.weight.dtype))
        return torch.stack([proj(a) for proj in self.audio_cond_projs]).float()

    # --- the forward -----------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, cond: Conditioning, attn: SelfAttention) -> Tensor:
        """Flow prediction v = noise - x0.

        x: (B, C, F, h, w) noisy latents; t: (B, F) timestep per latent frame in [0, 1000];
        attn: the self-attention context (sequence or KV cache). Returns (B, C, F, h, w) fp32.
        """
        cfg = self.cfg
        b, _, f, lat_h, lat_w = x.shape
        pt, ph, pw = cfg.patch_size
        dtype = self.patch_embedding.weight.dtype
        inp = torch.cat([x, cond.y], dim=1) if cfg.has_reference else x
        tokens = self.patch_embedding(inp.to(dtype))  # (B, D, F, h', w')
        gh, gw = tokens.shape[-2:]
        h = tokens.flatten(3).permute(0, 2, 3, 1).float()  # (B, F, S, D) fp32 residual stream

        t_emb = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, t.reshape(-1)).to(dtype)).float()
        e = self.time_projection(t_emb.to(dtype)).float().view(b, f, 6, cfg.dim)  # fp32
        t_emb = t_emb.view(b, f, cfg.dim)

        for i, blk in enumerate(self.blocks):
            if cond.audio is not None and 2 <= i <= cfg.num_layers // 2:
                h = h + cond.audio[i - 2].unsqueeze(2)  # (B, F, 1, D) onto every token of its frame
            if self.grad_checkpointing and torch.is_grad_enabled() and isinstance(attn, SequenceAttention):
                h = torch.utils.checkpoint.checkpoint(blk, h, e, cond.text_kv[i], i, attn, use_reentrant=False)
            else:
                h = blk(h, e, cond.text_kv[i], i, attn)

        out = self.head(h, t_emb).float()  # (B, F, S, pt*ph*pw*C)
        out = out.view(b, f, gh, gw, pt, ph, pw, cfg.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, cfg.out_dim, f * pt, gh * ph, gw * pw)
