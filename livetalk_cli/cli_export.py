"""`livetalk export`: a model's DiT passes and streaming VAE decoder as ONNX, AOTInductor and
TensorRT engines (library: `livetalk_cli/export/`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from livetalk_cli.cli_common import (
    CheckpointOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    PresetOpt,
    RandomWeightsOpt,
    UserError,
    app,
    err,
    user_errors,
)


@app.command("export")
def export_cmd(
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    random_weights: RandomWeightsOpt = False,
    seed: Annotated[int, typer.Option(help="Seed of --random-weights.")] = 0,
    formats: Annotated[
        str, typer.Option("--format", metavar="onnx,aoti,trt,trt-rtx",
                          help="Comma-separated formats. trt and trt-rtx build from the ONNX file (made too).")
    ] = "onnx",
    out: Annotated[Path, typer.Option(help="Engines root: artifacts go to OUT/<model>-<weights hash>/.")] = Path(
        "engines"),
    component: Annotated[
        list[str] | None,
        typer.Option(help="Only these components (dit_denoise, dit_refill, vae_first, vae_step); repeatable."),
    ] = None,
    trt_sm: Annotated[
        str, typer.Option(help="GPU compute capability TensorRT-RTX builds for without a GPU (75, 80, 86, 89, "
                               "120, 121). Full TensorRT always builds for this machine's GPU."),
    ] = "89",
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.auto,
    force: Annotated[bool, typer.Option("--force", help="Rebuild artifacts that are up to date.")] = False,
    attention: Annotated[
        str, typer.Option(metavar="sdpa|csrc",
                          help="The DiT's attention over the KV cache: sdpa (MatMul/Softmax everywhere) or csrc "
                               "(the livetalk::sink_ring_attention op: AOTInductor calls it, the fused CUDA kernel "
                               "where built; ONNX gets a livetalk::SinkRingAttention node ONNX Runtime cannot run).")
    ] = "sdpa",
) -> None:
    """Export the DiT's denoise and refill passes and the streaming VAE decoder (first latent, steady
    step) with the KV cache and the decoder's conv cache as explicit inputs and outputs.

    Every artifact is checked against eager PyTorch right after it is built (the figures go into
    each component's manifest.json). An export that is up to date does nothing; --force rebuilds.
    Run the engines with `livetalk render --engine DIR` or `livetalk bench --engine DIR`.
    """
    from livetalk_cli.export.build import check_export_attention, check_formats, export_model
    from livetalk_cli.export.contract import COMPONENTS
    from livetalk_cli.files import check_writable
    from livetalk_cli.pipeline import load_model, resolve_device, resolve_dtype

    with user_errors():
        fmts = [f.strip() for f in formats.split(",") if f.strip()]
        bad = [c for c in component or [] if c not in COMPONENTS]
        if bad:
            raise UserError(f"unknown component(s) {', '.join(bad)}; choose from {', '.join(COMPONENTS)}")
        fmts = check_formats(fmts)  # before the model loads, like the folder check
        check_export_attention(attention, fmts)
        check_writable(out / ".probe")
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype.value, dev)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                      transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("loading model", total=None)
            model = load_model(checkpoint=checkpoint, preset_name=preset and preset.value,
                               random_weights=random_weights, device=dev, dtype=torch_dtype, seed=seed)
            report = export_model(model, out, fmts, force=force, only=component, trt_sm=trt_sm, attention=attention,
                                  on_status=lambda s: progress.update(task, description=f"exporting {s}"))
    table = Table(title=f"{report.folder}", title_justify="left")
    for col in ("component", "format", "file", "MB", "build s", "max |Δ| vs eager"):
        table.add_column(col, justify="left" if col in ("component", "format", "file") else "right")
    for b in report.built:
        par = b["parity"]
        table.add_row(b["component"], b["format"], b["file"], f"{b['bytes'] / 1e6:.1f}", f"{b['build_s']:.1f}",
                      f"{par['max_abs']:.1e}" if par else b.get("parity_note", "not run"))
    for name, fmt in report.kept:
        table.add_row(name, fmt, "", "", "", "up to date", style="dim")
    Console().print(table)
    if not report.built:
        err.print(f"export: up to date ({report.folder}); --force rebuilds", highlight=False)
    else:
        err.print(f"export: wrote {len(report.built)} artifact(s) to {report.folder}", highlight=False)
