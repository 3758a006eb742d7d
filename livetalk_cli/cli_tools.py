"""`livetalk eval` and `livetalk presets`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from livetalk_cli.cli_common import app, err, user_errors
from livetalk_cli.config import PRESETS


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
    csv_out: Annotated[
        Path | None,
        typer.Option("--csv", help="Write one CSV row per video here; '-' writes it to stdout instead of the table."),
    ] = None,
    windows: Annotated[
        float | None,
        typer.Option("--windows", metavar="SECONDS",
                     help="Also score consecutive windows of this many seconds (long streams): lip-sync, offset, "
                          "identity and flicker per window, in the table (the mean over videos when several) "
                          "and per video in --json."),
    ] = None,
) -> None:
    """Score talking-head VIDEOS against the audio they carry and a reference image.

    \b
    lip-sync: Pearson correlation of mouth opening (pixels near the mouth-interior colour) with the audio envelope.
    offset: the frame offset of the best correlation, -8..8; positive = video lags audio.
    identity: mean of a joint-RGB histogram distance and a 12x12 layout error vs the reference, 0..1.
    flicker: mean absolute difference between consecutive frames, on 0..255.
    black%, frozen%: frames with mean intensity < 10; consecutive frames differing by < 0.25 on average.
    drift/min: slope of the per-second identity error, in error units per minute; only for videos of
      at least 20 s (shorter: "–" in the table, null in the JSON; the mean is over those that have one).
    --windows S: the same per consecutive S-second window (a last, shorter one if it holds half a window).
    The table fits the terminal (80 columns when piped, as plain text); --json and --csv keep every digit.
    """
    from livetalk_cli.files import check_output_file, write_text_atomic
    from livetalk_cli.tables import eval_csv, print_eval
    from livetalk_cli.world.evaluate import evaluate_files, mean_result

    to_stdout = csv_out is not None and str(csv_out) == "-"
    with user_errors():
        for path in (json_out, None if to_stdout else csv_out):
            if path is not None:
                check_output_file(path)  # before the videos are decoded
        results = evaluate_files(videos, reference, json_out, windows)
        if csv_out is not None and not to_stdout:
            write_text_atomic(csv_out, eval_csv(results))
    if to_stdout:
        typer.echo(eval_csv(results), nl=False)
    else:
        print_eval(results, mean_result(results) if len(results) > 1 else None, Console())
    for path in (json_out, None if to_stdout else csv_out):
        if path is not None:
            err.print(f"wrote {path}", highlight=False)


@app.command()
def presets() -> None:
    """List the model presets (--preset): resolution, fps, size and streaming settings."""
    import torch

    from livetalk_cli.config import preset as get_preset
    from livetalk_cli.models.dit import WanDiT

    lines = [f"{'preset':<16} {'size':>8} {'fps':>3} {'DiT':>8} {'params':>6}  {'text':<7} {'audio':<8} stream"]
    for name in PRESETS:
        cfg = get_preset(name)
        with torch.device("meta"):
            params = sum(p.numel() for p in WanDiT(cfg.dit).parameters())
        st = cfg.stream
        stream = (f"{st.block_frames}/{st.num_steps} {st.sink_frames}+{st.window_frames} "
                  f"{'rel' if st.relative_rope else 'abs'}")
        dit = f"{cfg.dit.num_layers}x{cfg.dit.dim}"
        audio = cfg.audio.encoder if cfg.dit.audio_dim else "-"
        lines.append(f"{name:<16} {cfg.width:>4}x{cfg.height:<3} {cfg.fps:>3} {dit:>8} {_count(params):>6}  "
                     f"{cfg.text_encoder:<7} {audio:<8} {stream}")
    typer.echo("\n".join(lines))
    typer.echo("DiT: layers x width. stream: latent frames per block / steps,\n"
               "sink + window latent frames, RoPE positions absolute or relative.")


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
