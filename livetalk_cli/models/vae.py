"""Wan2.1-compatible causal 3D VAE with an explicit streaming cache.

Parameter names follow Wan2.1 (`wan/modules/vae.py`) so `Wan2.1_VAE.pth` loads by name. Time is
causal everywhere: a 3-tap temporal conv sees the current frame and the two before it, and zeros
before the stream starts. Streaming state lives in a `VAEStreamCache`; every module that needs
history gets a fixed slot index once at construction (`_assign_cache_slots`).

The streaming decoder's engine contract is functional: `decode_first(z) -> (frames, slots)` for a
stream's first latents and `decode_next(z, slots) -> (frames, new slots)` for every later chunk
(1..block_frames latents), the slots a fixed-shape list of tensors named by `decoder_slot_names()`.

Semantics (whole-sequence form; chunked streaming gives the same frames):
- decoder `upsample3d`: out = [x0, interleave(time_conv(x1..))], 1 + 2(T-1) frames;
- encoder `downsample3d`: out = [x0, time_conv(x)] with kernel 3, stride 2, no padding, 1 + (T-1)/2.

Legend: B batch, C channels, T frames (video or feature), F latent frames, H/W height/width.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from livetalk_cli.config import VAEConfig


@dataclass(slots=True)
class VAEStreamCache:
    """Streaming state of one encoder or decoder stream.

    `slots[i]` belongs to the module whose `cache_slot == i`: the last `causal_pad` input frames of
    a causal conv, or the last frame of an encoder `downsample3d`. None means "nothing yet" (zeros).
    After the first call every slot holds a tensor of fixed shape. `started` is plain Python state:
    False until the first chunk of the stream has gone through.
    """

    slots: list[Tensor | None]
    started: bool = False

    @classmethod
    def empty(cls, num_slots: int) -> VAEStreamCache:
        return cls(slots=[None] * num_slots)

    def reset(self) -> None:
        self.slots = [None] * len(self.slots)
        self.started = False


class CausalConv3d(nn.Conv3d):
    """Conv3d padded on the left in time (2 * pad_t frames), symmetric in H/W.

    Spatial zero padding is done by the conv itself (same result as padding first, one copy fewer).
    With a cache, the slot's stored frames are prepended instead of zeros and then updated.
    `time_folded` (set for export by `fold_time_convs`) computes the same conv as one Conv2d over
    frames with the time taps stacked as channels.
    """

    time_folded = False

    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=(0, ph, pw))
        self.causal_pad = 2 * pt
        self.cache_slot = -1  # set by _assign_cache_slots when causal_pad > 0

    def forward(self, x: Tensor, cache: VAEStreamCache | None) -> Tensor:  # (B,C,T,H,W)
        p = self.causal_pad
        if p > 0:
            if cache is None:
                x = F.pad(x, (0, 0, 0, 0, p, 0))
            else:
                assert self.cache_slot >= 0, "cache slots were not assigned"
                hist = cache.slots[self.cache_slot]
                if hist is None:
                    hist = x.new_zeros(x.shape[0], x.shape[1], p, x.shape[3], x.shape[4])
                x = torch.cat([hist, x], dim=2)
                cache.slots[self.cache_slot] = x[:, :, -p:].clone()
        if self.time_folded:
            return self._time_folded_conv(x)
        if _use_onednn(x):
            return torch.ops.aten.mkldnn_convolution(
                x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups
            )
        return super().forward(x)

    def _time_folded_conv(self, x: Tensor) -> Tensor:
        """The conv over time-padded x (B,C,T,H,W) as a Conv2d: output frame j reads frames
        j*st .. j*st+kt-1, stacked tap-major into kt*C channels, against the weight laid out the same
        way. Exporters map Conv2d to their fastest kernels (ONNX Runtime's blocked NCHWc convs on a
        CPU), which they lack for 3D convs."""
        kt, st = self.kernel_size[0], self.stride[0]
        b, c, t, h, w = x.shape
        t_out = (t - kt) // st + 1
        taps = [x[:, :, i: i + st * (t_out - 1) + 1: st] for i in range(kt)]  # each (B,C,T',H,W)
        x2 = torch.cat(taps, dim=1).transpose(1, 2).reshape(b * t_out, kt * c, h, w)
        weight = self.weight.transpose(1, 2).reshape(self.out_channels, kt * c, *self.kernel_size[1:])
        y = F.conv2d(x2, weight, self.bias, self.stride[1:], self.padding[1:])
        return y.view(b, t_out, *y.shape[1:]).transpose(1, 2)


@contextmanager
def fold_time_convs(module: nn.Module) -> Iterator[None]:
    """Within the block, every `CausalConv3d` of `module` runs as a time-folded Conv2d (export)."""
    convs = [m for m in module.modules() if isinstance(m, CausalConv3d)]
    for m in convs:
        m.time_folded = True
    try:
        yield
    finally:
        for m in convs:
            m.time_folded = False


def _use_onednn(x: Tensor) -> bool:
    """Route CPU fp32 3D convs to oneDNN directly.

    PyTorch's backend heuristic sends batch-1 convs whose N*C*T*H is at most 20480 to its slow
    reference kernel, which is 2-5x slower than oneDNN for the small decoder's middle stages
    (measured on a 2-core CPU). Same math; skipped under compile/export, which pick their own.
    """
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
        and not torch.compiler.is_compiling() and not torch.jit.is_scripting()
    )


def _call(layer: nn.Module, x: Tensor, cache: VAEStreamCache | None) -> Tensor:
    """Run one layer, handing the cache to the layers that stream."""
    if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)):
        return layer(x, cache)
    return layer(x)


def _run(layers: nn.Sequential, x: Tensor, cache: VAEStreamCache | None) -> Tensor:
    for layer in layers:
        x = _call(layer, x, cache)
    return x


class RMSNorm(nn.Module):
    """`F.normalize(x, dim=1) * sqrt(C) * gamma`; gamma (C,1,1,1) for 5D input, (C,1,1) for images.

    Computed in the input dtype like Wan (bf16 is fine; fp16 can overflow the sum of squares).
    """

    def __init__(self, dim: int, images: bool) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # (B,C,T,H,W) or (B,C,H,W)
        # Same as F.normalize(x, dim=1) (eps 1e-12 on the norm), several times faster on CPU.
        inv_norm = torch.rsqrt((x * x).sum(dim=1, keepdim=True).clamp_min(1e-24))
        return x * inv_norm * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """norm-SiLU-conv-norm-SiLU-dropout-conv plus a (1x1x1 conv) shortcut; Wan key layout."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: VAEStreamCache | None) -> Tensor:  # (B,Cin,T,H,W) -> (B,Cout,..)
        return _call(self.shortcut, x, cache) + _run(self.residual, x, cache)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W tokens of each frame, residual add."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor) -> Tensor:  # (B,C,T,H,W)
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(y)).reshape(b * t, 3 * c, h * w).transpose(1, 2)  # (BT, HW, 3C)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each (BT, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        y = self.proj(y).reshape(b, t, c, h, w).transpose(1, 2)
        return x + y


class Upsample2x(nn.Module):
    """Nearest-exact 2x upsampling of H/W, computed in float32 (no parameters)."""

    def forward(self, x: Tensor) -> Tensor:  # (N,C,H,W) -> (N,C,2H,2W)
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """2x spatial up/down sampling, optionally with 2x temporal up/down sampling (`*3d` modes).

    Upsampling halves the channels (dim -> dim // 2); downsampling keeps them.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.cache_slot = -1  # used by downsample3d (its last input frame)
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown Resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)

    def forward(self, x: Tensor, cache: VAEStreamCache | None) -> Tensor:  # (B,C,T,H,W)
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        b, c, t, h, w = x.shape
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        y = y.reshape(b, t, *y.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            y = self._time_down(y, cache)
        return y

    def _time_up(self, x: Tensor, cache: VAEStreamCache | None) -> Tensor:
        """(B,C,T,H,W) -> (B,C,T',H,W): the stream's first frame passes alone, later ones double."""
        first_call = cache is None or not cache.started
        head, rest = (x[:, :, :1], x[:, :, 1:]) if first_call else (x[:, :, :0], x)
        if rest.shape[2] == 0:
            if cache is not None:  # history of time_conv starts as zeros, not frame 0
                b, c, _, h, w = x.shape
                cache.slots[self.time_conv.cache_slot] = x.new_zeros(b, c, self.time_conv.causal_pad, h, w)
            return head
        y = self.time_conv(rest, cache)  # (B, 2C, T, H, W)
        b, c2, t, h, w = y.shape
        y = y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return torch.cat([head, y], dim=2)

    def _time_down(self, x: Tensor, cache: VAEStreamCache | None) -> Tensor:
        """(B,C,T,H,W) -> (B,C,T',H,W): first frame alone, then stride-2 windows of 3 frames."""
        if cache is not None and cache.started:
            hist = cache.slots[self.cache_slot]
            assert hist is not None, "downsample3d history missing after the first chunk"
            cache.slots[self.cache_slot] = x[:, :, -1:].clone()
            return self.time_conv(torch.cat([hist, x], dim=2), None)
        if cache is not None:
            cache.slots[self.cache_slot] = x[:, :, -1:].clone()
        if x.shape[2] == 1:
            return x
        return torch.cat([x[:, :, :1], self.time_conv(x, None)], dim=2)


def _assign_cache_slots(root: nn.Module) -> int:
    """Give every module that keeps history a fixed slot index (registration order); returns the count."""
    n = 0
    for m in root.modules():
        if (isinstance(m, CausalConv3d) and m.causal_pad > 0) or (
            isinstance(m, Resample) and m.mode == "downsample3d"
        ):
            m.cache_slot = n
            n += 1
    return n


class Encoder3d(nn.Module):
    """(B,3,T,H,W) video -> (B,2z,T',H/8,W/8) features; T' = 1 + (T-1)/4 for the default config."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                layers.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*layers)
        out = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(out, out), AttentionBlock(out), ResidualBlock(out, out))
        self.head = nn.Sequential(
            RMSNorm(out, images=False), nn.SiLU(), CausalConv3d(out, 2 * cfg.z_dim, 3, padding=1)
        )
        self.num_cache_slots = _assign_cache_slots(self)

    def forward(self, x: Tensor, cache: VAEStreamCache | None) -> Tensor:
        x = self.conv1(x, cache)
        for seq in (self.downsamples, self.middle, self.head):
            x = _run(seq, x, cache)
        if cache is not None:
            cache.started = True
        return x


class Decoder3d(nn.Module):
    """(B,z,F,h,w) latent -> (B,3,1+4(F-1),8h,8w) video (not clamped) for the default config."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * u for u in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            if i > 0:
                in_dim //= 2  # the previous Resample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1)
        )
        self.num_cache_slots = _assign_cache_slots(self)

    def forward(self, x: Tensor, cache: VAEStreamCache | None) -> Tensor:
        x = self.conv1(x, cache)
        for seq in (self.middle, self.upsamples, self.head):
            x = _run(seq, x, cache)
        if cache is not None:
            cache.started = True
        return x


class WanVAE(nn.Module):
    """Wan2.1 VAE: `encoder`, `conv1` (2z->2z), `conv2` (z->z), `decoder`; normalised latents.

    `mean`/`std` are non-persistent buffers (not checkpoint keys), rebuilt from the config after
    every `load_state_dict` (so a meta-device build loaded with `assign=True` gets real ones).
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        z = cfg.z_dim
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(cfg)
        self.register_buffer("mean", torch.empty(z), persistent=False)
        self.register_buffer("std", torch.empty(z), persistent=False)
        self.init_buffers()
        self.register_load_state_dict_post_hook(_init_buffers_after_load)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the latent mean/std buffers from the config, in float32."""
        device = self.conv2.weight.device if device is None else device
        self.mean = torch.tensor(self.cfg.latent_mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(self.cfg.latent_std, dtype=torch.float32, device=device)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1, 1, 1, 1)
        return self.mean.to(x.dtype).view(shape), self.std.to(x.dtype).view(shape)

    def encode(self, video: Tensor) -> Tensor:
        """(B,3,T,H,W) in [-1,1], T = 1+4k -> normalised latent mean (B,z,1+k,H/8,W/8).

        The encoder streams: the first frame alone, then chunks of 4 frames, so memory is bounded.
        """
        tf, sf = self.cfg.temporal_factor, self.cfg.spatial_factor
        _, c, t, h, w = video.shape
        if c != 3 or (t - 1) % tf or h % sf or w % sf:
            raise ValueError(
                f"encode wants (B,3,1+{tf}k,H,W) with H, W multiples of {sf}; got {tuple(video.shape)}"
            )
        cache = self.new_encode_cache()
        chunks = [video[:, :, :1], *(video[:, :, 1:].split(tf, dim=2) if t > 1 else ())]
        return torch.cat([self.encode_step(chunk, cache) for chunk in chunks], dim=2)

    def new_encode_cache(self) -> VAEStreamCache:
        return VAEStreamCache.empty(self.encoder.num_cache_slots)

    def encode_step(self, chunk: Tensor, cache: VAEStreamCache) -> Tensor:
        """Continue an encoder stream: the first frame alone, then 4 frames per call → one latent."""
        mu = self.conv1(self.encoder(chunk, cache), None)[:, : self.cfg.z_dim]  # conv1 is 1x1x1
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def encode_reference(self, image: Tensor, still_latents: int) -> Tensor:
        """The DiT's reference latents: image (B,3,1,H,W) in [-1,1] → (B,z,max(1, N),h,w).

        N = `still_latents` (`ModelConfig.still_reference_latents`): 0 gives the single-frame
        latent; N > 0 encodes the image held still for 1 + 4(N-1) frames, one latent per position.
        Latent 0 is the single-frame latent either way (the encoder sees frame 0 alone).
        """
        return StillReference(self, image, still_latents).upto(still_latents)

    def decode(self, z: Tensor) -> Tensor:
        """Whole latent sequence (B,z,F,h,w) in one call, no cache -> (B,3,1+4(F-1),8h,8w) in [-1,1]."""
        return self._decode(z, None)

    # --- the streaming decoder's engine contract: explicit, fixed-shape named slots ---------------
    def decoder_slot_names(self) -> list[str]:
        """The decoder's streaming slots in order: the module each belongs to (a causal conv keeps
        its last 2 input frames; an `upsample3d` time conv likewise)."""
        names = {m: n for n, m in self.decoder.named_modules()}
        slots = sorted((m.cache_slot, f"decoder.{names[m]}") for m in self.decoder.modules()
                       if getattr(m, "cache_slot", -1) >= 0)
        return [name for _, name in slots]

    def decode_first(self, z: Tensor) -> tuple[Tensor, list[Tensor]]:
        """A stream's first latents (B,z,T,h,w), T >= 1 → frames (B,3,1+4(T-1),8h,8w) (the first
        latent decodes to one frame) and the decoder's slots after them (`decoder_slot_names()`
        order; fixed shapes whatever T)."""
        cache = VAEStreamCache.empty(self.decoder.num_cache_slots)
        frames = self._decode(z, cache)
        return frames, cache.slots  # type: ignore[return-value]  # the call writes every slot

    def decode_next(self, z: Tensor, slots: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Later latents (B,z,T,h,w) and the slots of the call before → (B,3,4T,8h,8w) and the new
        slots. Pure: the input slots are not modified (no output is ever bound onto an input)."""
        if len(slots) != self.decoder.num_cache_slots:
            raise ValueError(f"decode_next wants {self.decoder.num_cache_slots} slots, got {len(slots)}")
        cache = VAEStreamCache(list(slots), started=True)
        frames = self._decode(z, cache)
        return frames, cache.slots  # type: ignore[return-value]

    def _decode(self, z: Tensor, cache: VAEStreamCache | None) -> Tensor:
        if z.ndim != 5 or z.shape[1] != self.cfg.z_dim or z.shape[2] < 1:
            raise ValueError(f"decode wants latents (B,{self.cfg.z_dim},F>=1,h,w); got {tuple(z.shape)}")
        mean, std = self._stats(z)
        x = self.conv2(z * std + mean, None)
        return self.decoder(x, cache).clamp(-1.0, 1.0)


class StillReference:
    """`WanVAE.encode_reference`, encoded as far as a stream has got: `upto(n)` runs the causal
    encoder over as many more still frames as latents [0, n) need (at most `still_latents`), so a
    stream's first block only waits for its own positions.
    """

    def __init__(self, vae: WanVAE, image: Tensor, still_latents: int):
        if image.ndim != 5 or image.shape[2] != 1:
            raise ValueError(f"the reference image must be (B,3,1,H,W); got {tuple(image.shape)}")
        self.vae, self.image, self.limit = vae, image, max(1, still_latents)
        self.cache = vae.new_encode_cache()
        with torch.no_grad():
            self.latents = vae.encode_step(image, self.cache)

    def upto(self, n: int) -> Tensor:
        """(B, z, min(n, limit), h, w) — every latent encoded so far when it is more."""
        tf = self.vae.cfg.temporal_factor
        with torch.no_grad():
            while self.latents.shape[2] < min(n, self.limit):
                step = self.vae.encode_step(self.image.expand(-1, -1, tf, -1, -1), self.cache)
                self.latents = torch.cat([self.latents, step], dim=2)
        return self.latents


def _init_buffers_after_load(module: nn.Module, incompatible_keys: object) -> None:
    assert isinstance(module, WanVAE)
    module.init_buffers()
