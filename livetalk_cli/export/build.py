"""`livetalk export`: every component of a model in the asked formats, checked against eager
right after it is built, into `engines/<model>-<weights hash>/<component>/`.

A component folder is written whole into a temporary folder and renamed into place, so a failed
or interrupted export (or a full disk) leaves the previous folder as it was and nothing half
written. Artifacts that are up to date (same weights, dtype, config and contract; the file as
recorded; for AOTInductor the same torch) are kept, not rebuilt, unless `force`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from livetalk_cli.errors import UserError
from livetalk_cli.export import backends
from livetalk_cli.export.backends import EagerEngine, Engine, artifact_name, file_size
from livetalk_cli.export.contract import COMPONENTS, Component, components
from livetalk_cli.export.manifest import attention_of, manifest_payload, model_folder, weights_hash
from livetalk_cli.files import atomic_dir, check_writable
from livetalk_cli.kernels import sink_ring
from livetalk_cli.pipeline import LoadedModel

log = logging.getLogger(__name__)

# worst relative L2 error (over a component's outputs) an engine may show against eager
PARITY_LIMIT = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass
class ExportReport:
    folder: Path
    built: list[dict[str, Any]] = field(default_factory=list)  # component, format, seconds, bytes, parity
    kept: list[tuple[str, str]] = field(default_factory=list)  # (component, format) already up to date


def parity(engine: Engine, reference: tuple[torch.Tensor, ...], inputs: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Max |Δ| and relative L2 error of an engine's outputs against eager's, worst output."""
    out = engine(*inputs)
    max_abs = rel = 0.0
    for o, r in zip(out, reference, strict=True):
        d = (o.float().to(r.device) - r.float())
        max_abs = max(max_abs, d.abs().max().item())
        rel = max(rel, (d.norm() / r.float().norm().clamp_min(1e-12)).item())
    return {"max_abs": max_abs, "rel_l2": rel}


def _still_valid(fmt: str, folder: Path, entry: dict[str, Any]) -> bool:
    """Is the recorded artifact still there, whole, and usable by the installed tools?"""
    f = folder / entry.get("file", "")
    if not f.is_file() or file_size(f) != entry.get("bytes"):
        return False
    if fmt == "aoti":
        return entry.get("torch") == torch.__version__
    if fmt in ("trt", "trt-rtx"):
        from livetalk_cli.export.tensorrt import trt_version

        try:
            return entry.get("version") == trt_version(fmt)
        except UserError:
            return False
    return True


def _kept(folder: Path, want: dict[str, Any], formats: list[str], force: bool) -> dict[str, Any]:
    """The artifacts of an existing component folder that need no rebuild."""
    path = folder / "manifest.json"
    if force or not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if any(old.get(k) != want[k] for k in ("format", "model", "dtype", "weights_sha256", "contract")):
        return {}
    if attention_of(old) != attention_of(want):
        return {}
    return {fmt: e for fmt, e in old.get("artifacts", {}).items() if fmt in formats and _still_valid(fmt, folder, e)}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _build_one(fmt: str, comp: Component, tmp: Path, reference: tuple[torch.Tensor, ...], dtype: torch.dtype,
               device: torch.device, trt_sm: str | None) -> dict[str, Any]:
    c = comp.contract
    t0 = time.perf_counter()
    if fmt == "onnx":
        backends.export_onnx(comp, tmp / "model.onnx")
        seconds = time.perf_counter() - t0
        entry: dict[str, Any] = {"file": artifact_name(fmt), "onnx_opset": backends.OPSET}
        engine: Engine | None = None
        if uses_custom_op(comp):
            entry["parity_note"] = f"not run: ONNX Runtime has no kernel for {sink_ring.ONNX_OP} (--attention csrc)"
        else:
            engine = backends.OrtEngine(tmp / "model.onnx", c, device)
    elif fmt == "aoti":
        backends.export_aoti(comp, tmp / "model.pt2")
        seconds = time.perf_counter() - t0
        engine = backends.AotiEngine(tmp / "model.pt2", c, device)
        entry = {"file": artifact_name(fmt), "torch": torch.__version__, "device": device.type}
    else:
        from livetalk_cli.export import tensorrt

        # full TensorRT builds for this GPU; TensorRT-RTX for `trt_sm` (no GPU needed)
        plan = tensorrt.build_plan(tmp / "model.onnx", c, tmp, flavor=fmt, sm=trt_sm if fmt == "trt-rtx" else None,
                                   timing_cache=tmp.parent / "timing.cache")  # the model folder's
        seconds = time.perf_counter() - t0
        version = tensorrt.trt_version(fmt)
        entry = {"file": plan.name, "version": version, "sm": plan.stem.rsplit("_sm", 1)[1]}
        engine = None
        if fmt == "trt" and device.type == "cuda":
            engine = tensorrt.TrtEngine(plan, c, device, flavor=fmt)
        else:
            entry["parity_note"] = ("not run: TensorRT-RTX plans run on RTX GPUs only" if fmt == "trt-rtx"
                                    else "not run: no CUDA device")
    entry.update(bytes=file_size(tmp / entry["file"]), build_s=round(seconds, 2), parity=None)
    if engine is not None:
        entry["parity"] = parity(engine, reference, comp.example)
        limit = PARITY_LIMIT.get(dtype, 1e-2)
        if entry["parity"]["rel_l2"] > limit:
            raise UserError(f"{c.component} as {fmt} differs from eager by relative L2 "
                            f"{entry['parity']['rel_l2']:.2e} (limit {limit:.0e}); nothing was written")
    return entry


def uses_custom_op(comp: Component) -> bool:
    return getattr(comp.module, "attention", "sdpa") == "csrc"


def check_export_attention(attention: str, formats: list[str]) -> None:
    """--attention for an export: sdpa anywhere; csrc into AOTInductor (which calls the op) and ONNX (a
    livetalk::SinkRingAttention node for TensorRT with csrc/trt's plugin), not into TensorRT here."""
    if attention not in ("sdpa", "csrc"):
        raise UserError(f"export --attention takes sdpa or csrc, not {attention!r}")
    trt = [f for f in formats if f in ("trt", "trt-rtx")]
    if attention == "csrc" and trt:
        raise UserError(f"--attention csrc cannot build {', '.join(trt)} here: TensorRT needs the csrc plugin "
                        "(cmake -DLIVETALK_TRT_PLUGIN=ON) loaded, which this toolkit does not load yet; "
                        "export --format onnx and build with the plugin, or use --attention sdpa")


def check_formats(formats: list[str]) -> list[str]:
    """The formats to build, in build order (ONNX first when TensorRT needs it), after checking each
    is known and its extra installed: one line, before any model is loaded."""
    unknown = [f for f in formats if f not in backends.FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown format(s) {', '.join(unknown) or '(none)'}; "
                        f"choose from {', '.join(backends.FORMATS)}")
    if any(f.startswith("trt") for f in formats) and "onnx" not in formats:
        formats = ["onnx", *formats]  # TensorRT builds from the ONNX file
    formats = [f for f in backends.FORMATS if f in formats]
    if "onnx" in formats:
        backends.require("onnxscript", "onnx", "ONNX export")
        backends.require("onnxruntime", "onnx", "ONNX export (its parity check)")
    for fmt in formats:
        if fmt.startswith("trt"):
            from livetalk_cli.export.tensorrt import import_tensorrt

            import_tensorrt(fmt)
    return formats


def export_model(
    model: LoadedModel,
    out_root: Path,
    formats: list[str],
    *,
    force: bool = False,
    only: list[str] | None = None,
    trt_sm: str | None = None,
    attention: str = "sdpa",
    on_status: Callable[[str], None] = lambda s: None,
) -> ExportReport:
    """Export `only` (default: every component) of `model` in `formats` under `out_root`, the DiT's
    window attention as `attention` ("sdpa" or "csrc")."""
    formats = check_formats(formats)
    check_export_attention(attention, formats)
    check_writable(Path(out_root) / ".probe")
    cfg, dtype = model.cfg, model.dtype
    if attention == "csrc":  # on CUDA the kernel must be built and take this dtype and head dim
        sink_ring.resolve_backend("csrc", model.device, dtype, cfg.dit.head_dim)
    on_status("hashing weights")
    whash = weights_hash(model.dit, model.vae)
    folder = model_folder(out_root, cfg, whash)
    report = ExportReport(folder)
    comps = components(cfg, model.dit, model.vae, attention=attention)
    for name in only or list(COMPONENTS):
        comp = comps[name]
        target = folder / name
        want = manifest_payload(name, comp.contract, cfg, dtype, whash, {},
                                attention="csrc" if uses_custom_op(comp) else "sdpa")
        kept = _kept(target, want, formats, force)
        todo = [f for f in formats if f not in kept]
        report.kept += [(name, f) for f in kept]
        if not todo:
            continue
        reference = EagerEngine(comp)(*comp.example)
        artifacts: dict[str, Any] = dict(kept)
        try:
            with atomic_dir(target) as tmp:
                for f in [kept[k]["file"] for k in kept] + (["model.onnx.data"] if "onnx" in kept else []):
                    if (target / f).is_file():  # ONNX weights over 2 GB live beside the graph
                        _link_or_copy(target / f, tmp / f)
                for fmt in todo:
                    on_status(f"{name}: {fmt}")
                    log.info("exporting %s as %s", name, fmt)
                    artifacts[fmt] = _build_one(fmt, comp, tmp, reference, dtype, model.device, trt_sm)
                    report.built.append({"component": name, "format": fmt, **artifacts[fmt]})
                want["artifacts"] = artifacts
                (tmp / "manifest.json").write_text(json.dumps(want, indent=2) + "\n")
        except OSError as e:
            raise UserError(f"cannot write engines to {target}: {e.strerror or e}; nothing was changed") from None
    return report
