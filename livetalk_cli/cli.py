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


@app.command()
def distill(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (or a folder holding recipe.yaml).")],
    stage: Annotated[
        str | None, typer.Option(help="Run only this stage: vae, teacher, trajectories, ode_init or dmd.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Override every training stage's step count.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (overrides the recipe's `out`).")] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="After the stages, evaluate every model of the run on held-out world clips and "
                          "write report.md + report.json to this folder."),
    ] = None,
    report_clips: Annotated[int, typer.Option(help="Held-out clips in the report.")] = 64,
    report_stream_s: Annotated[float, typer.Option(help="Length of the sinks/no-sinks streams (0 = skip).")] = 60.0,
) -> None:
    """Distil a many-step bidirectional teacher into a causal 4-step student (run a RECIPE's stages).

    Every stage resumes from its last checkpoint, so a killed run continues where it stopped.
    Multi-process: `torchrun --nproc-per-node N -m livetalk_cli distill RECIPE` (gloo on CPU).
    The final student is written to OUT/student (a `livetalk render --checkpoint` folder).
    """
    from livetalk_cli.distill.recipe import load_recipe
    from livetalk_cli.distill.run import run_recipe

    with user_errors():
        r = load_recipe(recipe, out=out, max_steps=max_steps)
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[losses]}"), console=err, transient=True,
        ) as progress:
            tasks: dict[str, int] = {}

            def on_progress(name: str, done: int, total: int, values: dict[str, float]) -> None:
                if name not in tasks:
                    tasks[name] = progress.add_task(name, total=total, losses="")
                shown = "  ".join(f"{k} {v:.4g}" for k, v in values.items() if "loss" in k or k in ("l1", "mse"))
                progress.update(tasks[name], completed=done, total=total, losses=shown)

            ctx = run_recipe(r, stage=stage, on_progress=on_progress)
            if report is not None and ctx.ranks.main:
                from livetalk_cli.distill.report import build_report

                build_report(ctx, report, clips=report_clips, stream_seconds=report_stream_s)
        if ctx.ranks.main:
            err.print(f"distill: finished {stage or ', '.join(r.stages)} in {r.out}", highlight=False)
            if report is not None:
                err.print(f"report: {report / 'report.md'}", highlight=False)


@app.command("eval")
def eval_cmd(
    videos: Annotated[list[Path], typer.Argument(help="MP4 videos with their audio track.")],
    reference: Annotated[
        Path | None,
        typer.Option("--reference", help="Reference image for every video. Default: <video stem>.ref.png beside it."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write per-video results and their mean as JSON here.")
    ] = None,
) -> None:
    """Score talking-head VIDEOS against the audio they carry and a reference image.

    \b
    lip-sync: Pearson correlation of mouth opening (pixels near the mouth-interior colour) with the audio envelope.
    offset: the frame offset of the best correlation, -8..8; positive = video lags audio.
    identity: mean of a joint-RGB histogram distance and a 12x12 layout error vs the reference, 0..1.
    flicker: mean absolute difference between consecutive frames, on 0..255.
    black: frames with mean intensity < 10; frozen: consecutive frames differing by < 0.25 on average.
    drift: slope of the per-second identity error, in error units per minute.
    """
    from rich import box
    from rich.table import Table

    from livetalk_cli.world.evaluate import evaluate_files, mean_result

    with user_errors():
        results = evaluate_files(videos, reference, json_out)
    table = Table(box=box.SIMPLE_HEAD)
    for name in ("video", "lip-sync", "offset", "identity", "flicker", "black%", "frozen%", "drift/min"):
        table.add_column(name, justify="left" if name == "video" else "right", no_wrap=True, min_width=len(name))

    def row(name: str, r: dict[str, float], offset: str) -> list[str]:
        return [
            name, f"{r['lip_sync_corr']:.3f}", offset, f"{r['identity_error']:.4f}", f"{r['flicker']:.2f}",
            f"{100 * r['black_frames']:.1f}", f"{100 * r['frozen_frames']:.1f}", f"{r['drift_per_min']:+.4f}",
        ]

    for r in results:
        table.add_row(*row(Path(r["video"]).name, r, f"{r['lip_sync_offset']:+d}"))
    if len(results) > 1:
        mean = mean_result(results)
        table.add_row(*row("mean", mean, f"{mean['lip_sync_offset']:+.1f}"), style="bold")
    Console().print(table)
    if json_out is not None:
        err.print(f"wrote {json_out}", highlight=False)


def main() -> None:
    app()
