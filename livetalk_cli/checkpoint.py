"""Weights in and out: state-dict reading, key naming, validation, and the checkpoint folder.

A checkpoint folder holds `config.json` and the weight files it names:

    {
      "format": "livetalk/1",
      "preset": "omniavatar-1.3b",          # or "model": {...} with the full ModelConfig
      "files": {
        "dit": "dit.safetensors",            # file, or a folder of *.safetensors shards
        "vae": "Wan2.1_VAE.pth",             # .pth (loaded with weights_only=True) or .safetensors
        "text_encoder": "umt5-xxl/",         # builtin: .safetensors; umt5: local HF folder, Wan's
                                             #   models_t5_umt5-xxl-enc-bf16.pth (tokenizer in
                                             #   google/umt5-xxl/ beside it) or a .safetensors file
                                             #   of precomputed prompt embeddings
        "audio_encoder": "wav2vec2-base-960h/"  # wav2vec2 presets: local HF folder
        "dit_lora": "OmniAvatar-1.3B/pytorch_model.pt"  # optional: merged into dit at load (lora.py)
      },
      "lora_alpha": 64                       # optional: else read from config.json beside dit_lora
    }

DiT weights may use Wan's original names or diffusers' names; wrappers such as
`{"generator": {...}}` and prefixes such as `model.` / `module.` / `_orig_mod.` are removed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from livetalk_cli.config import ModelConfig, preset
from livetalk_cli.errors import CheckpointError
from livetalk_cli.files import atomic_dir

FORMAT = "livetalk/1"
FILE_ROLES = ("dit", "dit_lora", "vae", "text_encoder", "audio_encoder")

# diffusers (WanTransformer3DModel) → Wan original names
_DIFFUSERS_TOP = {
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "proj_out.": "head.head.",
    "scale_shift_table": "head.modulation",
}
_DIFFUSERS_BLOCK = {
    "attn1.to_q.": "self_attn.q.",
    "attn1.to_k.": "self_attn.k.",
    "attn1.to_v.": "self_attn.v.",
    "attn1.to_out.0.": "self_attn.o.",
    "attn1.norm_q.": "self_attn.norm_q.",
    "attn1.norm_k.": "self_attn.norm_k.",
    "attn2.to_q.": "cross_attn.q.",
    "attn2.to_k.": "cross_attn.k.",
    "attn2.to_v.": "cross_attn.v.",
    "attn2.to_out.0.": "cross_attn.o.",
    "attn2.norm_q.": "cross_attn.norm_q.",
    "attn2.norm_k.": "cross_attn.norm_k.",
    "ffn.net.0.proj.": "ffn.0.",
    "ffn.net.2.": "ffn.2.",
    "norm2.": "norm3.",
    "scale_shift_table": "modulation",
}
_WRAPPERS = ("generator_ema", "generator", "state_dict", "model", "module", "ema")
_PREFIXES = ("module.", "model.", "_orig_mod.", "diffusion_model.", "generator.")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A .safetensors file, a folder of .safetensors shards, a shards' `*.safetensors.index.json`
    (diffusers / transformers layout), or a torch pickle (weights_only, memory-mapped when it can be)."""
    path = Path(path)
    try:
        if path.name.endswith(".safetensors.index.json"):
            return _read_index(path)
        if path.is_dir():
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{path}: folder has no .safetensors files")
            sd: dict[str, Tensor] = {}
            for shard in shards:
                sd.update(load_file(str(shard)))
            return sd
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file not found")
        if path.suffix == ".safetensors":
            return load_file(str(path))
        try:
            obj: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the pre-zip pickle format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt files raise many different types
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], dict)), None)
        if inner is None:
            raise CheckpointError(f"{path}: no state dict found (top-level keys: {sorted(obj)[:8]})")
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict")
    return obj


def _read_index(index: Path) -> dict[str, Tensor]:
    """Shards named by an index's weight_map, each read once; every listed tensor must be there."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    sd: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index}: shard {shard} not found")
        sd.update(load_file(str(index.parent / shard)))
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} tensor(s) listed but not in their shards: "
                              f"{', '.join(missing[:6])}")
    return sd


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, Tensor) for v in d.values())


def to_wan_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes and map diffusers names onto Wan's original names."""
    changed = True
    while changed and sd:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    if not any(k.startswith("condition_embedder.") or ".attn1." in k for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        out[_diffusers_key(k)] = v
    return out


def _diffusers_key(k: str) -> str:
    if k.startswith("blocks."):
        _, idx, rest = k.split(".", 2)
        for src, dst in _DIFFUSERS_BLOCK.items():
            if rest.startswith(src):
                return f"blocks.{idx}.{dst}{rest[len(src):]}"
        return k
    for src, dst in _DIFFUSERS_TOP.items():
        if k.startswith(src):
            return dst + k[len(src) :]
    return k


def check_keys(module: nn.Module, sd: dict[str, Tensor], what: str) -> None:
    """One CheckpointError listing missing, unexpected and mis-shaped keys (if any)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(sd) & set(expected))
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            shown = ", ".join(items[:6]) + (f", ... (+{len(items) - 6})" if len(items) > 6 else "")
            problems.append(f"{len(items)} {label} key(s): {shown}")
    if problems:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(problems))


def load_weights(module: nn.Module, sd: dict[str, Tensor], what: str) -> None:
    """Validate then load (assign=True, so a meta-device module takes the tensors as they are)."""
    check_keys(module, sd, what)
    module.load_state_dict(sd, strict=True, assign=True)


# --- the checkpoint folder ---------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointSpec:
    root: Path
    config: ModelConfig
    files: dict[str, Path | None]
    lora_alpha: float | None = None


def read_dit_weights(spec: CheckpointSpec) -> dict[str, Tensor]:
    """The checkpoint's DiT tensors under Wan's names, its LoRA (files.dit_lora) merged in."""
    from livetalk_cli.lora import merged_dit_weights

    assert spec.files["dit"] is not None
    return merged_dit_weights(spec.files["dit"], spec.files["dit_lora"], spec.lora_alpha)


def read_checkpoint_spec(root: Path) -> CheckpointSpec:
    root = Path(root)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        from livetalk_cli.downloads import detect_download

        found = detect_download(root) if root.is_dir() else None
        if found is None:
            raise CheckpointError(f"{root}: not a checkpoint folder (no config.json, and not laid out like "
                                  "LiveTalk's or OmniAvatar's download)")
        return found
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: format must be {FORMAT!r}, got {data.get('format')!r}")
    unknown = sorted(set(data) - {"format", "preset", "model", "files", "lora_alpha"})
    if unknown:
        raise CheckpointError(f"{cfg_path}: unknown key(s) {unknown}")
    if ("preset" in data) == ("model" in data):
        raise CheckpointError(f"{cfg_path}: give exactly one of 'preset' or 'model'")
    cfg = preset(data["preset"]) if "preset" in data else ModelConfig.from_dict(data["model"])
    files_in = data.get("files", {})
    bad = sorted(set(files_in) - set(FILE_ROLES))
    if bad:
        raise CheckpointError(f"{cfg_path}: unknown file role(s) {bad}; roles are {list(FILE_ROLES)}")
    files: dict[str, Path | None] = {}
    for role in FILE_ROLES:
        name = files_in.get(role)
        files[role] = None if name is None else root / name
        if files[role] is not None and not files[role].exists():
            raise CheckpointError(f"{cfg_path}: {role} file {name!r} not found")
    for role in ("dit", "vae"):
        if files[role] is None:
            raise CheckpointError(f"{cfg_path}: files.{role} is required")
    alpha = data.get("lora_alpha")
    if alpha is not None and (not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0):
        raise CheckpointError(f"{cfg_path}: lora_alpha must be a positive number, got {alpha!r}")
    return CheckpointSpec(root, cfg, files, None if alpha is None else float(alpha))


def save_checkpoint(
    root: Path, cfg: ModelConfig, modules: dict[str, nn.Module], extra_files: dict[str, str] | None = None
) -> None:
    """Write a checkpoint folder atomically: `modules` maps roles to modules saved as safetensors."""
    with atomic_dir(Path(root)) as tmp:
        files: dict[str, str] = dict(extra_files or {})
        for role, module in modules.items():
            if role not in FILE_ROLES:
                raise ValueError(f"unknown role {role}")
            sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            save_file(sd, str(tmp / f"{role}.safetensors"))
            files[role] = f"{role}.safetensors"
        meta = {"format": FORMAT, "model": cfg.to_dict(), "files": files}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
