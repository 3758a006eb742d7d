"""`--engine DIR`: open a model's exported components for the streaming loop, after checking that
they were built for this model (`manifest.check_manifest`) and that their files are whole.

Backends are chosen per side (the DiT's two passes, the VAE decoder's two calls): `auto`, a format
for both (`onnx`, `aoti`, `trt`, `eager`), or `dit=FMT,vae=FMT`. `auto` takes, per side, the first
that was built and can run here: on CUDA TensorRT (a plan for this TensorRT and GPU), AOTInductor
(built on CUDA), ONNX Runtime; on a CPU the DiT on AOTInductor, else ONNX Runtime, and the VAE
eager (its oneDNN 3D convolutions are as fast as either export there). Measurements:
reports/bench/README.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from livetalk_cli.errors import UserError
from livetalk_cli.export import backends
from livetalk_cli.export.backends import Engine, file_size
from livetalk_cli.export.manifest import (
    attention_of,
    check_manifest,
    contract_of,
    find_model_folder,
    read_manifest,
    weights_hash,
)
from livetalk_cli.export.runtime import EngineDecoder, EnginePasses, EngineSet
from livetalk_cli.pipeline import LoadedModel
from livetalk_cli.runtime.stream import check_engine_options

SIDES = {"dit": ("dit_denoise", "dit_refill"), "vae": ("vae_first", "vae_step")}
CHOICES = ("auto", *backends.RUNNABLE)


def parse_backend(spec: str) -> dict[str, str]:
    """'auto' | 'onnx' | 'dit=onnx,vae=eager' → {'dit': ..., 'vae': ...}."""
    spec = spec.strip()
    if "=" not in spec:
        if spec not in CHOICES:
            raise UserError(f"unknown engine backend {spec!r}; choose from {', '.join(CHOICES)} or dit=X,vae=Y")
        return {"dit": spec, "vae": spec}
    out = {"dit": "auto", "vae": "auto"}
    for part in spec.split(","):
        side, _, fmt = part.partition("=")
        if side.strip() not in SIDES or fmt.strip() not in CHOICES:
            raise UserError(f"bad engine backend {part!r}: use dit=X,vae=Y with X, Y from {', '.join(CHOICES)}")
        out[side.strip()] = fmt.strip()
    return out


def _plan_for(folder: Path, data: dict[str, Any], device: torch.device) -> dict[str, Any] | None:
    """The TensorRT plan of this folder that runs on this GPU with the installed TensorRT, if any."""
    entry = data["artifacts"].get("trt")
    if entry is None or device.type != "cuda":
        return None
    from livetalk_cli.export.tensorrt import trt_version

    major, minor = torch.cuda.get_device_capability(device)
    try:
        version = trt_version("trt")
    except UserError:
        return None
    return entry if entry.get("version") == version and entry.get("sm") == f"{major}{minor}" else None


def _runnable(fmt: str, folder: Path, data: dict[str, Any], device: torch.device) -> str | None:
    """Why `fmt` cannot run from this component folder, or None if it can."""
    if fmt == "eager":
        return None
    entry = data["artifacts"].get(fmt)
    if entry is None:
        built = ", ".join(data["artifacts"]) or "nothing"
        return f"{folder} has no {fmt} build (it has {built}): livetalk export --format {fmt}"
    if fmt == "onnx" and attention_of(data) == "csrc":
        return (f"{folder / entry['file']} calls livetalk::SinkRingAttention (exported with --attention csrc), "
                "which ONNX Runtime cannot run: use --engine-backend aoti or eager")
    if fmt == "aoti" and entry.get("device") != device.type:
        return f"{folder / entry['file']} was compiled for {entry.get('device')}, not {device.type}"
    if fmt == "trt" and _plan_for(folder, data, device) is None:
        have = entry.get("file")
        return (f"{folder} has no TensorRT plan for this GPU and TensorRT (it has {have}): export it again here"
                if device.type == "cuda" else "TensorRT engines need a CUDA device (--device cuda)")
    return None


def _auto(side: str, datas: list[tuple[Path, dict[str, Any]]], device: torch.device) -> str:
    """The first format, in the device's order of preference, that every component of the side has."""
    order = ["trt", "aoti", "onnx"] if device.type == "cuda" else (["aoti", "onnx"] if side == "dit" else [])
    for fmt in order:
        if all(_runnable(fmt, c, d, device) is None for c, d in datas):
            return fmt
    return "eager"


def _open(fmt: str, folder: Path, data: dict[str, Any], model: LoadedModel) -> Engine:
    contract = contract_of(data)
    entry = data["artifacts"][fmt]
    path = folder / entry["file"]
    if not path.is_file():
        raise UserError(f"{path} is missing: export it again")
    if file_size(path) != entry["bytes"]:
        raise UserError(f"{path} is truncated or changed ({file_size(path)} bytes, the manifest says "
                        f"{entry['bytes']}): export it again with --force")
    if fmt == "onnx":
        return backends.OrtEngine(path, contract, model.device)
    if fmt == "aoti":
        return backends.AotiEngine(path, contract, model.device)
    from livetalk_cli.export.tensorrt import TrtEngine

    return TrtEngine(path, contract, model.device, flavor="trt")


def load_engines(model: LoadedModel, path: Path, backend: str = "auto") -> EngineSet:
    """The engines of `path` for `model` (checked against it), per side as `backend` asks."""
    choice = parse_backend(backend)
    whash = weights_hash(model.dit, model.vae)
    folder = find_model_folder(path, model.cfg, whash)
    opened: dict[str, list[Engine]] = {}
    chosen: dict[str, str] = {}
    for side, names in SIDES.items():
        datas = []
        for name in names:
            comp = folder / name
            data = read_manifest(comp)
            check_manifest(data, comp, model.cfg, model.dtype, whash)
            datas.append((comp, data))
        fmt = choice[side]
        if fmt == "auto":
            fmt = _auto(side, datas, model.device)
        for comp, data in datas:
            why = _runnable(fmt, comp, data, model.device)
            if why is not None:
                raise UserError(why)
        chosen[side] = fmt
        if fmt != "eager":
            opened[side] = [_open(fmt, c, d, model) for c, d in datas]
    passes = EnginePasses(model.cfg, *opened["dit"], model.device) if "dit" in opened else None
    decoder = EngineDecoder(model.cfg.vae, *opened["vae"]) if "vae" in opened else None
    return EngineSet(folder, chosen["dit"], chosen["vae"], passes, decoder)


def check_engine_args(path: Path, backend: str, *, compile: bool, cuda_graphs: bool) -> None:
    """What `--engine` needs that can be checked before the model loads."""
    parse_backend(backend)
    check_engine_options(compile=compile, cuda_graphs=cuda_graphs)
    if not Path(path).is_dir():
        raise UserError(f"engine folder not found: {path}")


def engine_variants(model: LoadedModel, folder: Path) -> list[str]:
    """`--engine-backend` values worth comparing for a model folder `load_engines` resolved and checked
    (`EngineSet.path`) on this device: each built format on one side (the other eager), then on both."""
    datas = {side: [(folder / n, read_manifest(folder / n)) for n in names] for side, names in SIDES.items()}
    runs = {side: [f for f in ("onnx", "aoti", "trt") if all(_runnable(f, c, d, model.device) is None for c, d in ds)]
            for side, ds in datas.items()}
    specs = [f"dit={f},vae=eager" for f in runs["dit"]] + [f"dit=eager,vae={f}" for f in runs["vae"]]
    specs += [f for f in runs["dit"] if f in runs["vae"]]
    return specs
