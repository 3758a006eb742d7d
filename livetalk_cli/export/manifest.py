"""Engine folders: what was built for which model, and the checks before an engine runs.

    engines/<model>-<weights hash>/<component>/
        manifest.json   the contract, the model config, dtype, weights hash, tool versions, and per
                        artifact its file, size, build time and the parity measured right after it
        model.onnx      ONNX (opset 20)              model.pt2   AOTInductor package
        engine_trt<version>_sm<cc>.plan              TensorRT (-RTX: engine_trtrtx…) plans
    engines/<model>-<weights hash>/timing.cache      full TensorRT's timing cache, shared by the components

An engine runs only for the model it was built from: same preset, config (and so shapes), dtype
and weights (a SHA-256 of every DiT and VAE tensor, in name order). Anything else is one line
naming what differs (exit 2) before any work.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from livetalk_cli.config import ModelConfig
from livetalk_cli.errors import UserError
from livetalk_cli.export.contract import COMPONENTS, DTYPE_NAMES, Contract

FORMAT = "livetalk-engine/1"


def weights_hash(*modules: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the modules' tensors: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().contiguous().cpu()
            h.update(f"{i}.{name}:{DTYPE_NAMES.get(t.dtype, str(t.dtype))}:{list(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_folder(root: Path, cfg: ModelConfig, whash: str) -> Path:
    return Path(root) / f"{cfg.name}-{whash}"


def versions() -> dict[str, str]:
    """Versions of the tools an artifact depends on (those installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for pkg in ("onnx", "onnxruntime", "onnxscript", "tensorrt", "tensorrt_rtx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} is not an engine component folder (no manifest.json)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} manifest")
    return data


def _config_diff(built: dict[str, Any], ours: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(built) | set(ours)):
        a, b = built.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key} {a} vs {b}")
    return diffs


def check_manifest(data: dict[str, Any], folder: Path, cfg: ModelConfig, dtype: torch.dtype, whash: str) -> None:
    """Raise UserError naming the first thing that differs between the engine and this model."""
    built = data["model"]
    if built["name"] != cfg.name:
        raise UserError(f"engine {folder} was built for preset {built['name']!r}; this model is {cfg.name!r}")
    diffs = _config_diff(built["config"], json.loads(json.dumps(cfg.to_dict())))
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise UserError(f"engine {folder} was built for another configuration (engine vs model: {shown})")
    ours = DTYPE_NAMES[dtype]
    if data["dtype"] != ours:
        raise UserError(f"engine {folder} was built for {data['dtype']}; this model runs {ours} (--dtype)")
    if data["weights_sha256"] != whash:
        raise UserError(f"engine {folder} was built for other weights (hash {data['weights_sha256']}, "
                        f"this model's {whash}): export it again for this checkpoint")


def find_model_folder(path: Path, cfg: ModelConfig, whash: str) -> Path:
    """`--engine` may name the model's engine folder or the folder above it (`engines/`)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"engine folder not found: {path}")
    if any((path / c / "manifest.json").is_file() for c in COMPONENTS):
        return path
    mine = model_folder(path, cfg, whash)
    if mine.is_dir():
        return mine
    others = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if others:
        raise UserError(f"{path} has no engines for this model ({mine.name}); it has: {', '.join(others[:4])}. "
                        "Run `livetalk export` for this model")
    raise UserError(f"{path} holds no engines: run `livetalk export` first")


def manifest_payload(component: str, contract: Contract, cfg: ModelConfig, dtype: torch.dtype, whash: str,
                     artifacts: dict[str, Any], attention: str = "sdpa") -> dict[str, Any]:
    """attention: the DiT passes' window backend (`components`); "sdpa" for the decoder."""
    return {"format": FORMAT, "component": component,
            "model": {"name": cfg.name, "config": json.loads(json.dumps(cfg.to_dict()))},
            "dtype": DTYPE_NAMES[dtype], "weights_sha256": whash, "contract": contract.to_json(),
            "attention": attention, "versions": versions(), "artifacts": artifacts}


def attention_of(data: dict[str, Any]) -> str:
    """A manifest's window backend (manifests from before the csrc op: "sdpa")."""
    return str(data.get("attention", "sdpa"))


def contract_of(data: dict[str, Any]) -> Contract:
    return Contract.from_json(data["contract"])
