"""Assemble a runnable model (DiT + VAE + encoders) from a checkpoint folder, random weights, or
the embedded default. Device and dtype are chosen here and nowhere else."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from livetalk_cli.checkpoint import (
    CheckpointSpec,
    load_weights,
    read_checkpoint_spec,
    read_dit_weights,
    read_state_dict,
)
from livetalk_cli.config import ModelConfig, preset
from livetalk_cli.errors import UserError
from livetalk_cli.models.audio import AudioFeatureEncoder, build_audio_encoder
from livetalk_cli.models.dit import WanDiT
from livetalk_cli.models.text import BuiltinTextEncoder, TextEncoder, build_text_encoder
from livetalk_cli.models.vae import WanVAE

if TYPE_CHECKING:
    from livetalk_cli.export.runtime import EngineSet

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = Path(__file__).parent / "assets" / "demo"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    cfg: ModelConfig
    dit: WanDiT
    vae: WanVAE
    text_encoder: TextEncoder
    audio_encoder: AudioFeatureEncoder
    device: torch.device
    dtype: torch.dtype
    source: str
    engines: EngineSet | None = None  # exported components in place of the eager DiT passes / decoder


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    if name != "float32" and device.type == "cpu":
        log.warning("--dtype %s on CPU is emulated by most CPUs and runs several times slower than float32 "
                    "(the VAE stays float32 on CPU); --dtype auto picks float32 here", name)
    return DTYPES[name]


def model_identity(*, checkpoint: Path | None, preset_name: str | None, random_weights: bool, seed: int) -> str:
    """A short name for the weights `load_model` would load with these arguments, without loading
    them: for a checkpoint folder, a hash of its config.json and of each file's name, size and first
    MiB (hashing whole multi-GB weight files would cost more than it tells)."""
    import hashlib

    if random_weights:
        return f"random-weights:{preset_name or 'tiny'}:seed={seed}"
    root = Path(checkpoint) if checkpoint is not None else EMBEDDED_DEFAULT
    if not root.is_dir():
        raise UserError(f"checkpoint folder not found: {root}")
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root)}:{f.stat().st_size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    name = "embedded-default" if checkpoint is None else root.name
    return f"{name}:{h.hexdigest()[:16]}"


def load_model(
    *,
    checkpoint: Path | None = None,
    preset_name: str | None = None,
    random_weights: bool = False,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
) -> LoadedModel:
    """The model to run. With neither a checkpoint nor random weights, the embedded default."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)  # resolved: checked already
    if checkpoint is not None and random_weights:
        raise UserError("--checkpoint and --random-weights exclude each other")
    if random_weights:
        return _random_model(preset(preset_name or "tiny"), dev, dt, seed)
    if checkpoint is None:
        if not (EMBEDDED_DEFAULT / "config.json").is_file():
            raise UserError(
                "this build has no embedded default model yet: pass --checkpoint DIR, or "
                "--random-weights to run the real architecture with random weights"
            )
        checkpoint = EMBEDDED_DEFAULT
    return _checkpoint_model(Path(checkpoint), preset_name, dev, dt)


def load_encoders(*, checkpoint: Path | None, preset_name: str | None, random_weights: bool,
                  device: torch.device, seed: int = 0) -> tuple[ModelConfig, WanVAE, AudioFeatureEncoder, str]:
    """Only the model's VAE (fp32 on CPU, bf16 on GPU) and audio encoder, and where they came from:
    what encoding training data needs (`livetalk prepare`), without the DiT's memory."""
    if checkpoint is not None and random_weights:
        raise UserError("--checkpoint and --random-weights exclude each other")
    if random_weights:  # the very encoders `load_model` draws for this seed (the DiT is drawn first)
        m = _random_model(preset(preset_name or "tiny"), device, torch.float32, seed)
        cfg, vae, audio, source = m.cfg, m.vae, m.audio_encoder, f"random weights ({m.cfg.name}, seed {seed})"
    else:
        root = Path(checkpoint) if checkpoint is not None else EMBEDDED_DEFAULT
        spec = _read_spec(root, preset_name)
        cfg, vae = spec.config, checkpoint_vae(spec)
        audio = build_audio_encoder(cfg, model_dir=spec.files["audio_encoder"], random_weights=False, device=device)
        source = str(root.resolve())
    vae = vae.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval().requires_grad_(False)
    return cfg, vae, audio, source


def _random_model(cfg: ModelConfig, dev: torch.device, dt: torch.dtype, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    with torch.device(dev):
        dit = WanDiT(cfg.dit)
        vae = WanVAE(cfg.vae)
    # Wan zero-initialises the output head (right for training, useless for running): random
    # weights here are random everywhere, so the DiT's output reaches the frames.
    torch.nn.init.xavier_uniform_(dit.head.head.weight)
    text = build_text_encoder(cfg, source=None, random_weights=True, device=dev)
    audio = build_audio_encoder(cfg, model_dir=None, random_weights=True, device=dev)
    log.info("random weights for preset %s", cfg.name)
    return _finish(cfg, dit, vae, text, audio, dev, dt, f"random weights ({cfg.name})")


def _read_spec(root: Path, preset_name: str | None) -> CheckpointSpec:
    spec = read_checkpoint_spec(root)
    if preset_name is not None and preset_name != spec.config.name:
        raise UserError(f"checkpoint {root} is a {spec.config.name!r} model, but --preset says {preset_name!r}")
    return spec


def checkpoint_vae(spec: CheckpointSpec) -> WanVAE:
    """The checkpoint's VAE, built on the meta device and given the file's tensors (no second copy)."""
    assert spec.files["vae"] is not None  # checked by read_checkpoint_spec
    with torch.device("meta"):
        vae = WanVAE(spec.config.vae)
    load_weights(vae, read_state_dict(spec.files["vae"]), f"VAE weights {spec.files['vae']}")  # hook restores mean/std
    return vae


def _checkpoint_model(root: Path, preset_name: str | None, dev: torch.device, dt: torch.dtype) -> LoadedModel:
    spec = _read_spec(root, preset_name)
    cfg, files = spec.config, spec.files
    assert files["dit"] is not None  # checked by read_checkpoint_spec
    with torch.device("meta"):
        dit = WanDiT(cfg.dit)
    load_weights(dit, read_dit_weights(spec), f"DiT weights {files['dit']}"
                 + (f" + LoRA {files['dit_lora']}" if files["dit_lora"] else ""))
    vae = checkpoint_vae(spec)
    text: TextEncoder
    if cfg.text_encoder == "builtin":
        if files["text_encoder"] is None:
            raise UserError(f"{root}: files.text_encoder is required for the built-in text encoder")
        enc = BuiltinTextEncoder(cfg.text_vocab, cfg.dit.text_len, cfg.dit.text_dim)
        load_weights(enc, read_state_dict(files["text_encoder"]), f"text encoder {files['text_encoder']}")
        text = enc.to(dev, torch.float32)  # the embedded default ships fp16 weights
    else:
        text = build_text_encoder(cfg, source=files["text_encoder"], random_weights=False, device=dev)
    audio = build_audio_encoder(cfg, model_dir=files["audio_encoder"], random_weights=False, device=dev)
    return _finish(cfg, dit, vae, text, audio, dev, dt, str(root))


def _finish(
    cfg: ModelConfig,
    dit: WanDiT,
    vae: WanVAE,
    text: TextEncoder,
    audio: AudioFeatureEncoder,
    dev: torch.device,
    dt: torch.dtype,
    source: str,
) -> LoadedModel:
    dit = dit.to(dev, dt).eval().requires_grad_(False)
    # The VAE runs in fp32 on CPU (no fast bf16 convs there) and in the model dtype on GPU.
    vae_dtype = dt if dev.type == "cuda" else torch.float32
    vae = vae.to(dev, vae_dtype).eval().requires_grad_(False)
    return LoadedModel(cfg, dit, vae, text, audio, dev, dt, source)
