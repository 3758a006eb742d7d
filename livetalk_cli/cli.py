"""`livetalk` command line: a thin Typer layer that parses, validates and calls library code.

Exit codes: 0 success, 1 some batch job failed, 2 bad input or configuration.
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from livetalk_cli.config import PRESETS
from livetalk_cli.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="LiveTalk: real-time audio-driven avatar video diffusion.",
)
err = Console(stderr=True)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )


@contextmanager
def user_errors() -> Iterator[None]:
    """A user error is one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


class Fit(StrEnum):
    crop = "crop"
    pad = "pad"


PresetOpt = Annotated[
    str | None, typer.Option(help=f"Model preset: {', '.join(PRESETS)}. Default: the checkpoint's own.")
]


@app.command()
def render(
    audio: Annotated[list[Path] | None, typer.Argument(help="Audio files (wav, mp3, m4a, flac, ogg, ...).")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Reference face (PNG/JPEG/WebP).")] = None,
    prompt: Annotated[str, typer.Option(help="Text prompt.")] = "",
    fit: Annotated[
        Fit, typer.Option(help="Fit the image to the preset's size: center-crop, or pad with black.")
    ] = Fit.crop,
    out: Annotated[Path | None, typer.Option("--out", help="Output MP4 (one audio file).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Folder for <audio stem>.mp4 outputs.")] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="JSON lines: {audio, image, prompt, out} per job; resumable.")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint folder (config.json + weights).")] = None,
    preset: PresetOpt = None,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights",
            help="Real architecture, random weights, for benchmarks and smoke tests. Real-size presets "
            "use random-weight stand-ins for the text and audio encoders (right shapes, no meaning).",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Re-render outputs that already exist.")] = False,
) -> None:
    """Render AUDIO files (+ a reference image and a prompt) into MP4 videos with the audio muxed in.

    Finished outputs are skipped, so an interrupted batch resumes where it stopped.
    """
    from livetalk_cli.pipeline import load_model
    from livetalk_cli.render import JobResult, RenderJob, jobs_from_args, read_manifest, render_batch

    with user_errors():
        if manifest is not None:
            if audio or out is not None or out_dir is not None:
                raise UserError("--manifest takes no AUDIO arguments, --out or --out-dir")
            jobs = read_manifest(manifest, image=image, prompt=prompt)
        else:
            jobs = jobs_from_args(audio or [], image, prompt, out, out_dir)
        model = load_model(
            checkpoint=checkpoint, preset_name=preset, random_weights=random_weights,
            device=device, dtype=dtype, seed=seed,
        )
        logging.getLogger(__name__).info("model: %s on %s (%s)", model.source, model.device, model.dtype)

        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err, transient=True,
        ) as progress:
            overall = progress.add_task("jobs", total=len(jobs))
            current: dict[str, int] = {}

            def start(job: RenderJob) -> None:
                current["task"] = progress.add_task(f"  {job.out.name}", total=None)

            def frames(done: int, total: int) -> None:
                progress.update(current["task"], completed=done, total=total)

            def end(result: JobResult) -> None:
                progress.advance(overall)
                if result.status == "failed":
                    err.print(f"[red]failed:[/] {result.job.audio}: {result.error}", highlight=False)
                elif result.status == "skipped":
                    err.print(f"skipped (exists): {result.job.out}", highlight=False)
                else:
                    err.print(
                        f"wrote {result.job.out}: {result.frames} frames, {result.audio_s:.2f} s of audio "
                        f"in {result.wall_s:.2f} s ({result.realtime_factor:.2f}x real time)",
                        highlight=False,
                    )

            results = render_batch(
                model, jobs, seed=seed, fit=fit.value, overwrite=overwrite,
                on_job_start=start, on_frames=frames, on_job_end=end,
            )
        failed = [r for r in results if r.status == "failed"]
        if failed:
            if len(results) > 1:
                err.print(f"[bold red]{len(failed)} of {len(results)} job(s) failed[/]")
            raise typer.Exit(1)


def main() -> None:
    app()
