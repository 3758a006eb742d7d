"""`livetalk prepare`: folders of real talking-head videos → latent shards for `distill`
(library: `livetalk_cli/prepare.py` and `prepare_media.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from livetalk_cli.cli_common import (
    CheckpointOpt,
    DeviceOpt,
    Fit,
    PresetOpt,
    RandomWeightsOpt,
    UserError,
    app,
    err,
    render_progress,
    user_errors,
)


@app.command("prepare")
def prepare_cmd(
    videos: Annotated[list[Path] | None, typer.Argument(help="Video files (anything PyAV reads) or folders of them.",
                                                        show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="Folder of the latent shards (a recipe's world.latents).")] = Path("data"),
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    random_weights: RandomWeightsOpt = False,
    clip_frames: Annotated[int, typer.Option(min=1, help="Video frames per clip (1 + 4k; the recipe's "
                                                         "world.clip_frames).")] = 81,
    fit: Annotated[Fit, typer.Option(help="crop: fill the frame, cut the overflow; pad: whole picture on "
                                          "black.")] = Fit.crop,
    manifest: Annotated[Path | None, typer.Option(help="JSON lines {\"video\", \"prompt\", \"box\": [x, y, w, h]}: "
                                                       "more videos, their prompts, a face box.")] = None,
    prompt: Annotated[str, typer.Option(help="The prompt of videos with neither a manifest prompt nor a VIDEO.txt "
                                             "beside them.")] = "a person talking",
    workers: Annotated[int, typer.Option(min=1, help="Videos probed and decoded at once.")] = 1,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option(help="With --random-weights: the weights' seed.")] = 0,
) -> None:
    """Cut real talking-head videos into the preset's clips and encode them as distill's latent
    shards: video resampled to the preset's fps and size, audio to mono at the model's rate, each
    clip's reference frame picked by exposure and sharpness. Resumable: a rerun keeps the shards
    that match and encodes the rest; unreadable and too-short videos are skipped and listed."""
    import torch

    from livetalk_cli.pipeline import load_encoders, resolve_device
    from livetalk_cli.prepare import prepare, read_captions, sources_for
    from livetalk_cli.prepare_media import Framing, find_videos

    with user_errors():
        entries = read_captions(manifest)
        found = find_videos(list(videos or []) + [e["video"] for e in entries.values()])
        if not found:
            raise UserError("no videos: give video files, folders of them, or --manifest")
        sources = sources_for(found, entries, prompt)
        dev = resolve_device(device)
        cfg, vae, encoder, where = load_encoders(checkpoint=checkpoint, preset_name=preset.value if preset else None,
                                                 random_weights=random_weights, device=dev, seed=seed)
        tf = cfg.vae.temporal_factor
        if (clip_frames - 1) % tf:
            raise UserError(f"--clip-frames {clip_frames} is not 1 + {tf}k (the VAE's temporal factor)")
        framing = Framing(cfg.height, cfg.width, cfg.fps, cfg.audio.sample_rate, clip_frames, fit.value)
        err.print(f"{len(sources)} videos → {out} ({cfg.name}: {cfg.width}x{cfg.height} at {cfg.fps} fps, "
                  f"{clip_frames} frames per clip; encoders from {where})", highlight=False)
        with render_progress() as progress:
            task = progress.add_task("probing videos", total=None, unit="clips")

            def on_plan(todo: int, total: int) -> None:
                progress.update(task, description=f"encoding ({total - todo} of {total} clips kept)", total=todo,
                                completed=0)

            with torch.inference_mode():
                summary = prepare(sources, out, framing=framing, vae=vae, encoder=encoder, encoders=where, cfg=cfg,
                                  workers=workers, on_plan=on_plan, on_clip=lambda: progress.advance(task))
    for video, why in summary.skipped.items():
        err.print(f"skipped {video}: {why}", highlight=False)
    for video, why in summary.failed.items():
        err.print(f"[red]unreadable[/] {video}: {why}", highlight=False)
    err.print(f"{out}: {summary.clips} clips in {summary.shards} shards ({summary.encoded} encoded now); "
              f"{len(summary.skipped)} skipped, {len(summary.failed)} unreadable", highlight=False)
    if summary.failed:
        raise typer.Exit(1)
