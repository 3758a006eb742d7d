"""Export contracts: what each exportable component takes and gives, declared in code.

A component is a pure function of named tensors with static shapes (batch 1, the preset's block
and window): the engine contract of `sampling/block_sampler.dit_pass` and of the streaming VAE
decoder (`WanVAE.decode_first` / `decode_next`), wrapped as an `nn.Module` whose positional
inputs and outputs follow the contract's names. Streaming state is explicit I/O: the DiT pass
reads the cache window and returns the block's K/V; the decoder reads and returns its conv-cache
slots. Python (the host loop) owns the ring, the steps and the VAE schedule.

Components:
* `dit_denoise`  one denoising pass of a block → flow
* `dit_refill`   the t = 0 pass → the block's K (pre-RoPE) and V, for `BlockKVCache.commit`
* `vae_first`    the stream's first latent → its one frame + the decoder's slots
* `vae_step`     one later latent + slots → 4 frames + new slots (the host loops over a chunk's
                 latents: a causal decoder gives the same frames latent by latent)

The mask input is always present (static graph): the host passes the cache's validity mask, or
all True once the cache is full.

Legend: NL layers, B batch (1), C latent channels, f block frames, h/w latent size, Lt text tokens,
H heads, D head dim, Np cached tokens, Nb block tokens, P = D // 2.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from livetalk_cli.config import ModelConfig
from livetalk_cli.models.attention import KVWindow
from livetalk_cli.models.dit import Conditioning, WanDiT
from livetalk_cli.models.vae import WanVAE, fold_time_convs
from livetalk_cli.pipeline import DTYPES as MODEL_DTYPES

COMPONENTS = ("dit_denoise", "dit_refill", "vae_first", "vae_step")
DTYPES = {**MODEL_DTYPES, "bool": torch.bool, "int64": torch.int64}  # a contract's tensors: the model's + masks
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # a DTYPE_NAMES value

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])

    def check(self, t: Tensor, where: str) -> None:
        if tuple(t.shape) != self.shape or DTYPE_NAMES.get(t.dtype) != self.dtype:
            raise ValueError(f"{where}: {self.name} must be {self.dtype}{list(self.shape)}, "
                             f"got {DTYPE_NAMES.get(t.dtype, t.dtype)}{list(t.shape)}")


@dataclass(frozen=True)
class Contract:
    """Names, shapes and dtypes of a component's inputs and outputs (static: one TensorRT profile
    with min = opt = max)."""

    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Contract:
        return cls(d["component"], tuple(TensorSpec.from_json(s) for s in d["inputs"]),
                   tuple(TensorSpec.from_json(s) for s in d["outputs"]))

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]


@dataclass
class Component:
    """An exportable module, its contract and example inputs (positional, in contract order).
    `aoti_mode` is entered around the AOTInductor export only: the same math in the form inductor
    compiles best (the eager module the engines are checked against runs without it)."""

    contract: Contract
    module: nn.Module
    example: tuple[Tensor, ...]
    aoti_mode: Callable[[], AbstractContextManager[None]] = nullcontext


def _spec(name: str, t: Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(t.shape), DTYPE_NAMES[t.dtype])


def _contract(component: str, module: nn.Module, names_in: list[str], names_out: list[str],
              example: tuple[Tensor, ...]) -> Component:
    with torch.no_grad():
        out = module(*example)
    outs = out if isinstance(out, tuple) else (out,)
    contract = Contract(component, tuple(_spec(n, t) for n, t in zip(names_in, example, strict=True)),
                        tuple(_spec(n, t) for n, t in zip(names_out, outs, strict=True)))
    return Component(contract, module.eval(), example)


# --- the DiT pass ------------------------------------------------------------------------------
def dit_input_names(cfg: ModelConfig) -> list[str]:
    names = ["x", "t"]
    names += ["y"] if cfg.dit.has_reference else []
    names += ["audio"] if cfg.dit.has_audio else []
    return names + ["text_k", "text_v", "past_k", "past_v", "rope_cos", "rope_sin", "mask"]


def dit_feeds(cfg: ModelConfig, x: Tensor, t: Tensor, cond: Conditioning, text_kv: tuple[Tensor, Tensor],
              window: KVWindow, mask: Tensor) -> list[Tensor]:
    """The DiT components' inputs in contract order. text_kv: the prompt's per-layer K/V stacked
    (NL, B, Lt, H, D) (`stack_text_kv`); mask: the window's mask or all True."""
    feeds = [x, t]
    if cfg.dit.has_reference:
        assert cond.y is not None
        feeds.append(cond.y)
    if cfg.dit.has_audio:
        assert cond.audio is not None
        feeds.append(cond.audio)
    return feeds + [*text_kv, window.k, window.v, window.cos, window.sin, mask]


def stack_text_kv(text_kv: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.stack([k for k, _ in text_kv]), torch.stack([v for _, v in text_kv])


class DiTPass(nn.Module):
    """`dit_pass` over contract-ordered tensors: flow (denoise) or the block's K/V (refill)."""

    def __init__(self, dit: WanDiT, cfg: ModelConfig, refill: bool, attention: str = "sdpa"):
        super().__init__()
        self.dit, self.refill, self.attention = dit, refill, attention
        self.names = dit_input_names(cfg)
        h, w = cfg.latent_hw
        self.sink_tokens = cfg.stream.sink_frames * (h // cfg.dit.patch_size[1]) * (w // cfg.dit.patch_size[2])

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        from livetalk_cli.sampling.block_sampler import dit_pass

        a = dict(zip(self.names, inputs, strict=True))
        nl = a["text_k"].shape[0]
        cond = Conditioning([(a["text_k"][i], a["text_v"][i]) for i in range(nl)], a.get("y"), a.get("audio"))
        window = KVWindow(a["past_k"], a["past_v"], a["rope_cos"], a["rope_sin"], a["mask"], backend=self.attention,
                          sink_tokens=self.sink_tokens)  # csrc: the op's seg from the mask, in the graph
        flow, k_blk, v_blk = dit_pass(self.dit, a["x"], a["t"], cond, window, keep_kv=self.refill)
        if self.refill:
            assert k_blk is not None and v_blk is not None
            return k_blk, v_blk
        return flow


def dit_example(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[Tensor, ...]:
    """Random inputs of the DiT components' shapes; the mask leaves the newest ring block invalid,
    so a parity check exercises masking."""
    from livetalk_cli.sampling.kv_cache import BlockKVCache

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, dt: torch.dtype = torch.float32) -> Tensor:
        return torch.randn(*shape, generator=g).to(device, dt)

    d, sc = cfg.dit, cfg.stream
    h, w = cfg.latent_hw
    f = sc.block_frames
    cache = BlockKVCache(d, sc, (h // d.patch_size[1], w // d.patch_size[2]), device=device, dtype=dtype)
    nl, _, np_, nh, hd = cache.k.shape
    nb = cache.cos.shape[0]
    x = {"x": rnd(1, d.out_dim, f, h, w), "t": torch.rand(1, f, generator=g).to(device) * 1000,
         "y": rnd(1, d.out_dim + 1, f, h, w), "audio": rnd(d.num_audio_layers, 1, f, d.dim) if d.has_audio else None,
         "text_k": rnd(nl, 1, d.text_len, nh, hd, dt=dtype), "text_v": rnd(nl, 1, d.text_len, nh, hd, dt=dtype),
         "past_k": rnd(nl, 1, np_, nh, hd, dt=dtype), "past_v": rnd(nl, 1, np_, nh, hd, dt=dtype)}
    x["rope_cos"], x["rope_sin"] = cache.rope.tables(torch.arange(f, device=device) + sc.sink_frames + sc.window_frames)
    mask = torch.ones(1, 1, 1, np_ + nb, dtype=torch.bool, device=device)
    if np_ > nb:
        mask[..., np_ - nb: np_] = False
    x["mask"] = mask
    return tuple(x[n] for n in dit_input_names(cfg))


# --- the VAE decoder ---------------------------------------------------------------------------
class VAEFirst(nn.Module):
    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> tuple[Tensor, ...]:
        frames, slots = self.vae.decode_first(z)
        return (frames, *slots)


class VAEStep(nn.Module):
    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor, *slots: Tensor) -> tuple[Tensor, ...]:
        frames, new = self.vae.decode_next(z, list(slots))
        return (frames, *new)


def slot_names(vae: WanVAE, prefix: str = "slot") -> list[str]:
    return [f"{prefix}_{i:02d}" for i in range(len(vae.decoder_slot_names()))]


def components(cfg: ModelConfig, dit: WanDiT, vae: WanVAE, *, seed: int = 0, attention: str = "sdpa"
               ) -> dict[str, Component]:
    """Every exportable component of a model, with its contract and example inputs. `attention`:
    the DiT passes' window backend ("sdpa": MatMul/Softmax; "csrc": the `livetalk::sink_ring_attention`
    op, a custom-domain node in ONNX)."""
    dtype = next(dit.parameters()).dtype
    device = next(dit.parameters()).device
    ex = dit_example(cfg, dtype, device, seed)
    names = dit_input_names(cfg)
    out: dict[str, Component] = {
        "dit_denoise": _contract("dit_denoise", DiTPass(dit, cfg, False, attention), names, ["flow"], ex),
        "dit_refill": _contract("dit_refill", DiTPass(dit, cfg, True, attention), names, ["block_k", "block_v"], ex),
    }
    vdt = next(vae.parameters()).dtype
    g = torch.Generator().manual_seed(seed + 1)
    h, w = cfg.latent_hw
    z0 = torch.randn(1, cfg.vae.z_dim, 1, h, w, generator=g).to(device, vdt)
    z1 = torch.randn(1, cfg.vae.z_dim, 1, h, w, generator=g).to(device, vdt)
    first = VAEFirst(vae)
    with torch.no_grad():
        slots = first(z0)[1:]
    sn = slot_names(vae)
    out["vae_first"] = _contract("vae_first", first, ["z"], ["frames", *slot_names(vae, "new_slot")], (z0,))
    out["vae_step"] = _contract("vae_step", VAEStep(vae), ["z", *sn], ["frames", *slot_names(vae, "new_slot")],
                                (z1, *slots))
    # Inductor has no oneDNN route for the decoder's 3D convs (eager has): as Conv2d over frames the
    # AOTInductor step ran 3.2x faster on a CPU (119 -> 37.5 ms, demo, 1 thread), level with eager.
    # ONNX Runtime was not faster folded (47.5 -> 46.5 ms) and slower at 2 threads, so ONNX keeps Conv3d.
    for name in ("vae_first", "vae_step"):
        out[name].aoti_mode = lambda: fold_time_convs(vae)
    return out

