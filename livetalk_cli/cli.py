"""`livetalk` command line: a thin Typer layer that parses, validates and calls library code.

Exit codes: 0 success, 1 some batch job failed, 2 bad input or configuration, 130 interrupted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from livetalk_cli.cli_common import (
    AttentionOpt,
    CompileOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    EngineBackendOpt,
    EngineOpt,
    Fit,
    GraphsOpt,
    PipelinedOpt,
    PresetOpt,
    ThreadsOpt,
    UserError,
    app,
    err,
    render_progress,
    user_errors,
)

__all__ = ["app", "main"]


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
    attention: AttentionOpt = "auto",
    engine: EngineOpt = None,
    engine_backend: EngineBackendOpt = "auto",
) -> None:
    """Render AUDIO files (+ a reference image and a prompt) into MP4 videos with the audio muxed in.

    Every job's inputs are checked before the model loads. An output that exists is skipped when
    it was made from the same inputs (a batch resumes); otherwise --overwrite is needed.
    """
    from livetalk_cli import dist_render
    from livetalk_cli.export.load import check_engine_args
    from livetalk_cli.jobs import job_record, jobs_from_args, plan_jobs, read_manifest
    from livetalk_cli.kernels.sink_ring import check_backend_name
    from livetalk_cli.pipeline import load_model, model_identity, resolve_device, resolve_dtype
    from livetalk_cli.render import JobResult, RenderJob, render_batch
    from livetalk_cli.runtime.stream import StreamOptions
    from livetalk_cli.sampling.accel import check_cuda_graphs

    ranks = dist_render.launched_ranks()  # under torchrun: this rank's share of the jobs (dist_render.py)
    with user_errors(), render_progress(quiet=not ranks.main) as progress:
        if manifest is not None:
            if audio or out is not None or out_dir is not None:
                raise UserError("--manifest takes no AUDIO arguments, --out or --out-dir")
            jobs = read_manifest(manifest, image=image, prompt=prompt)
        else:
            jobs = jobs_from_args(audio or [], image, prompt, out, out_dir)
        check_backend_name(attention)
        dev = dist_render.rank_device(resolve_device(device), ranks)
        torch_dtype = resolve_dtype(dtype.value, dev)  # warns once (half precision on CPU)
        dt = str(torch_dtype).removeprefix("torch.")
        if cuda_graphs:
            check_cuda_graphs(dev)
        if engine is not None:
            check_engine_args(engine, engine_backend, compile=compile, cuda_graphs=cuda_graphs)
        dist_render.init(ranks, dev)
        model_id = model_identity(checkpoint=checkpoint, preset_name=preset and preset.value,
                                  random_weights=random_weights, seed=seed)
        if engine is not None:  # an engine's frames differ from eager's by rounding: not the same output
            model_id += f"+engine:{engine.resolve()}:{engine_backend}"
        step = progress.add_task("checking inputs", total=len(jobs), unit="jobs")
        planned = plan_jobs(
            jobs, record=lambda job: job_record(job, model=model_id, seed=seed, fit=fit.value, dtype=dt),
            overwrite=overwrite, on_checked=lambda done, total: progress.update(step, completed=done),
        )
        progress.remove_task(step)
        planned = dist_render.my_jobs(planned, ranks)
        if all(p.skip for p in planned):
            model = None
        else:
            step = progress.add_task("loading model", total=None, unit="")
            model = load_model(
                checkpoint=checkpoint, preset_name=preset and preset.value, random_weights=random_weights,
                device=dev, dtype=torch_dtype, seed=seed,
            )
            if engine is not None:
                from livetalk_cli.export.load import load_engines

                model.engines = load_engines(model, engine, engine_backend)
            progress.remove_task(step)
            logging.getLogger(__name__).info("model: %s on %s (%s)", model.source, model.device, model.dtype)

        overall = progress.add_task("jobs", total=len(planned), unit="jobs") if len(planned) > 1 else None
        current: dict[str, int] = {}

        def start(job: RenderJob) -> None:
            current["task"] = progress.add_task(f"  {job.out.name}", total=None, unit="frames")

        def frames(done: int, total: int) -> None:
            progress.update(current["task"], completed=done, total=total)

        def end(result: JobResult) -> None:
            if overall is not None:
                progress.advance(overall)
            if "task" in current:
                progress.remove_task(current.pop("task"))
            if ranks.main:  # under torchrun rank 0 also reports the other ranks' results, at the end
                report(result)

        def report(result: JobResult) -> None:
            if result.status == "failed":
                err.print(f"[red]failed:[/] {result.job.out}: {result.error}", highlight=False)
            elif result.status == "skipped":
                err.print(f"skipped (exists, same input): {result.job.out}", highlight=False)
            else:
                err.print(
                    f"wrote {result.job.out}: {result.frames} frames, {result.audio_s:.2f} s of audio "
                    f"in {result.wall_s:.2f} s ({result.realtime_factor:.2f}x real time)",
                    highlight=False,
                )

        options = StreamOptions(pipelined=pipelined, compile=compile, cuda_graphs=cuda_graphs, threads=threads,
                                attention=attention)
        results = render_batch(
            model, planned, seed=seed, fit=fit.value, options=options,
            on_job_start=start, on_frames=frames, on_job_end=end,
        )
    if ranks.distributed:
        per_rank = dist_render.gather(results, ranks)
        dist_render.close(ranks)
        results = [r for rank_results in per_rank for r in rank_results]
        if ranks.main:
            for r in (r for other in per_rank[1:] for r in other):
                report(r)
            count = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
            by_rank = ", ".join(str(sum(r.status == "done" for r in rr)) for rr in per_rank)
            err.print(f"{ranks.world} ranks: {count['done']} rendered, {count['skipped']} skipped, "
                      f"{count['failed']} failed (rendered per rank: {by_rank})", highlight=False)
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
    max_steps: Annotated[
        int | None,
        typer.Option(help="Run every training stage for N steps and prepare only the data those steps use "
                          "(a smoke run of the whole recipe)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (overrides the recipe's `out`).")] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="After the stages, evaluate every model of the run on held-out world clips and "
                          "write report.md + report.json to this folder."),
    ] = None,
    report_clips: Annotated[int, typer.Option(help="Held-out clips in the report.")] = 64,
    report_stream_s: Annotated[
        float, typer.Option(help="Length of the long streams scored per 10-s window (0 = skip).")] = 60.0,
    report_identities: Annotated[int, typer.Option(help="Held-out identities of the long streams.")] = 16,
    report_sink_s: Annotated[
        float, typer.Option(help="Length of the sinks/no-sinks streams (0 = skip).")] = 300.0,
    report_sink_identities: Annotated[
        int, typer.Option(help="Held-out identities streamed with and without sinks (the paired test's n).")] = 8,
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
            TextColumn("{task.fields[losses]}"), console=err, transient=True, disable=not err.is_terminal,
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
                             identities=report_identities, sink_seconds=report_sink_s,
                             sink_identities=report_sink_identities)
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
    attention: AttentionOpt = "auto",
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
    background_load: Annotated[
        int, typer.Option(help="Also measure FPS and the first frame beside N busy processes (one core each).")
    ] = 0,
    speed_only: Annotated[bool, typer.Option("--speed-only", hidden=True)] = False,
    engine: EngineOpt = None,
    engine_backend: EngineBackendOpt = "auto",
    serve: Annotated[
        bool, typer.Option("--serve", help="Measure serve-local instead, through its WebSocket API: turn latency, "
                                           "sessions at once, memory of a --stream-minutes session.")
    ] = False,
    sessions: Annotated[int, typer.Option(min=1, help="--serve: try up to this many sessions at once.")] = 4,
    serve_seconds: Annotated[
        float, typer.Option(min=5, help="--serve: seconds of each sessions-at-once run (the first 3 not measured).")
    ] = 20.0,
    turns: Annotated[int, typer.Option(min=1, help="--serve: turns timed per way of sending audio.")] = 8,
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
    Engines: with --engine the streams run the exported components (--engine-backend); --compare
      adds a row per backend found (each side alone, then both).
    Serving (--serve): see `livetalk_cli/bench_serve.py`; a server and its clients in this process.
    """
    from livetalk_cli.bench import BenchSettings, configure, run_bench
    from livetalk_cli.bench_compare import variant_in_subprocess
    from livetalk_cli.export.load import check_engine_args, engine_variants, load_engines
    from livetalk_cli.files import check_output_file, write_json_atomic
    from livetalk_cli.kernels.sink_ring import check_backend_name
    from livetalk_cli.pipeline import load_model, resolve_device
    from livetalk_cli.runtime.stream import StreamOptions
    from livetalk_cli.sampling.accel import check_cuda_graphs

    if serve:
        from livetalk_cli.cli_serve import bench_serve

        bench_serve(checkpoint, preset, random_weights, device, dtype, seed, threads, engine, engine_backend,
                     sessions, serve_seconds, turns, stream_minutes, json_out)
        return
    with user_errors():
        settings = BenchSettings(
            height=height, width=width, steps=steps, block_frames=block_frames, sinks=sinks, window=window,
            blocks=blocks, warmup=warmup, repeats=repeats, stream_minutes=stream_minutes,
            stage_blocks=stage_blocks, compare=compare, speed_only=speed_only, background_load=background_load,
        )
        settings.validate()
        if json_out is not None:
            check_output_file(json_out)  # before minutes of measuring
        options = StreamOptions(pipelined=pipelined, compile=compile, cuda_graphs=cuda_graphs,
                                compile_backend=compile_backend, split_threads=split_threads, threads=threads,
                                attention=attention)
        check_backend_name(attention)
        if cuda_graphs:
            check_cuda_graphs(resolve_device(device))
        if engine is not None:
            check_engine_args(engine, engine_backend, compile=compile, cuda_graphs=cuda_graphs)
        if threads:  # every figure of this process (stage times, FLOP probe, streams) with that many
            import torch

            torch.set_num_threads(threads)
        model = load_model(checkpoint=checkpoint, preset_name=preset and preset.value,
                           random_weights=random_weights, device=device, dtype=dtype.value, seed=seed)
        specs: list[str] = []
        if engine is not None:
            model = configure(model, settings)  # the engine must match the benched shapes
            model.engines = load_engines(model, engine, engine_backend)
            specs = engine_variants(model, model.engines.path) if compare else []
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True, disable=not err.is_terminal) as progress:
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
                run_variant=lambda v, spec: variant_in_subprocess(
                    [*same_model, *(["--engine", str(engine)] if spec else [])], v, spec),
                engine_variants=specs,
            )
        if json_out is not None:
            write_json_atomic(json_out, result)
    from livetalk_cli.bench_table import print_bench

    print_bench(result)
    if json_out is not None:
        err.print(f"wrote {json_out}", highlight=False)


from livetalk_cli import cli_convert, cli_export, cli_prepare, cli_serve, cli_tools  # noqa: E402, F401  # convert, export, prepare, serve-local, eval, presets


def main() -> None:
    app()
