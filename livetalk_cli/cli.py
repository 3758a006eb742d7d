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
        force=True,  # each invocation (tests run several in one process) sets its own level
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


Preset = StrEnum("Preset", {name: name for name in PRESETS})  # type: ignore[misc]  # the choices in --help


class DType(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


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
GraphsOpt = Annotated[
    bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay the block step from CUDA graphs (CUDA only).")
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
            help="Real architecture, random weights (the output head too), for benchmarks and smoke tests. "
            "Real-size presets use random-weight stand-ins for the text and audio encoders (right shapes, "
            "no meaning).",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.auto,
    overwrite: Annotated[bool, typer.Option(help="Re-render outputs that already exist.")] = False,
    pipelined: PipelinedOpt = True,
    compile: CompileOpt = False,
    cuda_graphs: GraphsOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Render AUDIO files (+ a reference image and a prompt) into MP4 videos with the audio muxed in.

    Finished outputs are skipped, so an interrupted batch resumes where it stopped.
    """
    from livetalk_cli.pipeline import load_model, resolve_device
    from livetalk_cli.render import JobResult, RenderJob, jobs_from_args, read_manifest, render_batch
    from livetalk_cli.runtime.stream import StreamOptions
    from livetalk_cli.sampling.accel import check_cuda_graphs

    with user_errors():
        if manifest is not None:
            if audio or out is not None or out_dir is not None:
                raise UserError("--manifest takes no AUDIO arguments, --out or --out-dir")
            jobs = read_manifest(manifest, image=image, prompt=prompt)
        else:
            jobs = jobs_from_args(audio or [], image, prompt, out, out_dir)
        if cuda_graphs:
            check_cuda_graphs(resolve_device(device))
        model = load_model(
            checkpoint=checkpoint, preset_name=preset and preset.value, random_weights=random_weights,
            device=device, dtype=dtype.value, seed=seed,
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

            options = StreamOptions(pipelined=pipelined, compile=compile, cuda_graphs=cuda_graphs, threads=threads)
            results = render_batch(
                model, jobs, seed=seed, fit=fit.value, overwrite=overwrite, options=options,
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
        str | None, typer.Option(help="Run only this stage: vae, decoder, teacher, trajectories, ode_init or dmd.")
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
    report_identities: Annotated[
        int, typer.Option(help="Held-out identities streamed with and without sinks (the paired test's n).")
    ] = 24,
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

                build_report(ctx, report, clips=report_clips, stream_seconds=report_stream_s,
                             identities=report_identities)
        if ctx.ranks.main:
            err.print(f"distill: finished {stage or ', '.join(r.stages)} in {r.out}", highlight=False)
            if report is not None:
                err.print(f"report: {report / 'report.md'}", highlight=False)


@app.command()
def bench(
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint folder. Default: the embedded demo model.")
    ] = None,
    preset: PresetOpt = None,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="The preset's architecture with random weights (real size).")
    ] = False,
    height: Annotated[int | None, typer.Option(help="Frame height (default: the model's).")] = None,
    width: Annotated[int | None, typer.Option(help="Frame width (default: the model's).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps per block.")] = None,
    block_frames: Annotated[int | None, typer.Option(help="Latent frames per block.")] = None,
    sinks: Annotated[int | None, typer.Option(help="Identity-sink latent frames (0 = none).")] = None,
    window: Annotated[int | None, typer.Option(help="Ring-window latent frames.")] = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.auto,
    pipelined: PipelinedOpt = True,
    compile: CompileOpt = False,
    cuda_graphs: GraphsOpt = False,
    compile_backend: Annotated[str, typer.Option(help="torch.compile backend.", hidden=True)] = "inductor",
    split_threads: Annotated[
        bool, typer.Option("--split-threads/--no-split-threads",
                           help="CPU pipeline: half the intra-op threads for the DiT thread, half for the decoder.")
    ] = True,
    threads: ThreadsOpt = None,
    blocks: Annotated[int, typer.Option(help="Measured blocks per FPS run (>= 20).")] = 20,
    warmup: Annotated[int, typer.Option(help="Blocks of each FPS run before timing starts.")] = 3,
    repeats: Annotated[int, typer.Option(help="Repeats of every timing (median, min, max).")] = 3,
    stage_blocks: Annotated[int, typer.Option(help="Blocks timed stage by stage.")] = 8,
    stream_minutes: Annotated[
        float, typer.Option(help="Length of the stream whose memory must stay flat (0 = skip).")
    ] = 10.0,
    compare: Annotated[
        bool, typer.Option("--compare", help="Also measure each optimisation on/off (pipelining, compile, graphs).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of --random-weights.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every figure as JSON here.")] = None,
    speed_only: Annotated[bool, typer.Option("--speed-only", hidden=True)] = False,
) -> None:
    """Measure steady-state FPS, first-frame latency, per-stage times, memory and the FLOP floor.

    \b
    Real time: the preset's fps (16 for the Wan family).
    Steady-state FPS: generated frames per wall second over --blocks (>= 20) blocks after --warmup
      blocks of the same stream, through render's streaming pipeline, frames copied to the host.
    First-frame latency: from the call that starts a stream (model loaded and warm, the first block's
      audio available) to the first generated RGB frame on the host; the reference frame does not count.
    Audio before start: the audio the first block needs before it can start (its frames plus the
      audio encoder's look-ahead), the configuration's algorithmic latency, reported separately.
    Timing: device synchronised around timed regions, warm-up excluded, median of --repeats with min
      and max. Per-stage times come from the sequential eager path, synchronised after each stage.
    FLOP floor: FLOPs per frame (DiT passes + refill + VAE decode; matmuls and convolutions by torch's
      FlopCounterMode, attention counted here from its shapes, 2*Lq*Lk*D per head for QK^T and again
      for PV, on every device) over the device's measured dense matmul rate in the chosen dtype.
    Memory: CUDA allocated bytes on GPU, resident set on CPU, after every block of a --stream-minutes
      stream; after the first 10 %, the median of the last quarter minus that of the first quarter
      is the growth, flat if within max(16 MB, 2 %).
    """
    from livetalk_cli.bench import BenchSettings, run_bench, variant_in_subprocess
    from livetalk_cli.files import write_json_atomic
    from livetalk_cli.pipeline import load_model, resolve_device
    from livetalk_cli.runtime.stream import StreamOptions
    from livetalk_cli.sampling.accel import check_cuda_graphs

    with user_errors():
        settings = BenchSettings(
            height=height, width=width, steps=steps, block_frames=block_frames, sinks=sinks, window=window,
            blocks=blocks, warmup=warmup, repeats=repeats, stream_minutes=stream_minutes,
            stage_blocks=stage_blocks, compare=compare, speed_only=speed_only,
        )
        settings.validate()
        if json_out is not None and not json_out.parent.is_dir():
            raise UserError(f"output directory does not exist: {json_out.parent}")
        options = StreamOptions(pipelined=pipelined, compile=compile, cuda_graphs=cuda_graphs,
                                compile_backend=compile_backend, split_threads=split_threads, threads=threads)
        if cuda_graphs:
            check_cuda_graphs(resolve_device(device))
        if threads:  # every figure of this process (stage times, FLOP probe, streams) with that many
            import torch

            torch.set_num_threads(threads)
        model = load_model(checkpoint=checkpoint, preset_name=preset and preset.value,
                           random_weights=random_weights, device=device, dtype=dtype.value, seed=seed)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as progress:
            task = progress.add_task("bench", total=None)
            same_model = [*(["--checkpoint", str(checkpoint)] if checkpoint else []),
                          *(["--preset", preset.value] if preset else []),
                          *(["--random-weights"] if random_weights else []), "--device", device,
                          "--dtype", dtype.value, "--seed", str(seed), "--blocks", str(blocks),
                          "--warmup", str(warmup), "--repeats", str(repeats)]
            for flag, value in (("--height", height), ("--width", width), ("--steps", steps),
                                ("--block-frames", block_frames), ("--sinks", sinks), ("--window", window)):
                same_model += [flag, str(value)] if value is not None else []
            result = run_bench(
                model, options, settings,
                on_status=lambda text: progress.update(task, description=text, completed=0, total=None),
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
                run_variant=lambda v: variant_in_subprocess(same_model, v),
            )
        if json_out is not None:
            write_json_atomic(json_out, result)
    from livetalk_cli.bench_table import print_bench

    print_bench(result)
    if json_out is not None:
        err.print(f"wrote {json_out}", highlight=False)


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
