"""What every `livetalk` command shares: the Typer app, error handling, progress bars and the
option types. The commands are in `cli.py` (render, distill, bench) and `cli_tools.py` (eval,
presets).

Exit codes: 0 success, 1 some batch job failed, 2 bad input or configuration, 130 interrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from livetalk_cli.config import PRESETS
from livetalk_cli.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="LiveTalk: real-time audio-driven avatar video diffusion.",
)
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"livetalk {version('livetalk')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("livetalk (not installed: no version)")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
        force=True,  # each invocation (tests run several in one process) sets its own level
    )


@contextmanager
def user_errors() -> Iterator[None]:
    """A user error is one line on stderr and exit code 2, never a traceback. Ctrl-C is one line
    and exit code 130: every output is written to a temporary file renamed only when complete, so
    an interrupted command leaves no partial output (finished outputs stay)."""
    try:
        yield
    except UserError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted: no partial output was written (finished outputs are kept)", highlight=False)
        raise typer.Exit(130) from None


class RateColumn(ProgressColumn):
    """Items per second of a task (its `unit` field names them), once there is a rate."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        if not unit or task.speed is None:
            return Text("")
        return Text(f"{task.speed:.1f} {'fps' if unit == 'frames' else unit + '/s'}")


def render_progress(quiet: bool = False) -> Progress:
    """quiet: no bar at all (the ranks of a torchrun batch other than rank 0)."""
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True,
        disable=quiet or not err.is_terminal,  # piped stderr: the results' lines only
    )


class Fit(StrEnum):
    crop = "crop"
    pad = "pad"


Preset = StrEnum("Preset", {name: name for name in PRESETS})  # type: ignore[misc]  # the choices in --help


class DType(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


CheckpointOpt = Annotated[Path | None, typer.Option(help="Checkpoint folder. Default: the embedded demo model.")]
RandomWeightsOpt = Annotated[
    bool, typer.Option("--random-weights", help="The preset's architecture with random weights.")
]
PresetOpt = Annotated[Preset | None, typer.Option(help="Model preset. Default: the checkpoint's own.")]
DeviceOpt = Annotated[str, typer.Option(metavar="[auto|cpu|cuda|cuda:N]", help="Where the model runs.")]
DTypeOpt = Annotated[DType, typer.Option(help="auto: bf16 on GPU, fp32 on CPU.")]


PipelinedOpt = Annotated[
    bool, typer.Option("--pipelined/--sequential",
                       help="Denoise block n+1 while block n is decoded (worker thread; CUDA stream on GPU).")
]
CompileOpt = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the block step.")]
ThreadsOpt = Annotated[
    int | None, typer.Option(min=1, help="CPU intra-op threads for the stream (default: torch's, one per core).")
]
AttentionOpt = Annotated[
    str, typer.Option(metavar="auto|sdpa|csrc|flex",
                      help="Self-attention over the KV cache: sdpa (the reference), csrc (the fused CUDA kernel; "
                           "its reference op on CPU), flex (FlexAttention). auto: csrc on CUDA where it is "
                           "built, else sdpa.")
]


GraphsOpt = Annotated[
    bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay the block step from CUDA graphs (CUDA only).")
]
EngineOpt = Annotated[
    Path | None,
    typer.Option("--engine", help="Run exported components from this folder (`livetalk export`'s engines/<model>-"
                                  "<hash>/, or engines/ itself); checked against the model's weights and settings."),
]
EngineBackendOpt = Annotated[
    str,
    typer.Option("--engine-backend", metavar="auto|onnx|aoti|trt|eager|dit=X,vae=Y",
                 help="With --engine: which build runs each side (auto: TensorRT > AOTInductor > ONNX Runtime on "
                      "CUDA; on a CPU the DiT on AOTInductor, else ONNX Runtime, and the VAE eager)."),
]
