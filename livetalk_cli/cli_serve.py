"""`livetalk serve-local`: a real-time avatar server on this machine (library: `livetalk_cli/serve/`)."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from livetalk_cli.cli_common import (
    CheckpointOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    EngineBackendOpt,
    EngineOpt,
    PresetOpt,
    RandomWeightsOpt,
    UserError,
    app,
    err,
    user_errors,
)

if TYPE_CHECKING:
    from livetalk_cli.pipeline import LoadedModel


@app.command("serve-local")
def serve_local(
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    random_weights: RandomWeightsOpt = False,
    engine: EngineOpt = None,
    engine_backend: EngineBackendOpt = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback needs --token.")] = (
        "127.0.0.1"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8765,
    token: Annotated[
        str | None, typer.Option(help="Secret every connection must present (?token= or a Bearer header); "
                                      "'auto' makes one and prints the page's URL with it.")
    ] = None,
    max_sessions: Annotated[int, typer.Option(min=1, help="Sessions served at once; more get 'busy'.")] = 2,
    responder: Annotated[
        str, typer.Option(metavar="echo|file:PATH|command:CMD|http:URL",
                          help="What the avatar says: the user's own audio (echo), a reply file per turn, a "
                               "local program (turn WAV on stdin, reply audio on stdout) or a local HTTP "
                               "endpoint (turn POSTed as audio/wav, reply audio returned).")
    ] = "echo",
    lead: Annotated[
        float | None, typer.Option(min=0.05, help="Seconds ahead of playback the first block of a turn queued "
                                                  "whole may be made (default: the idle lead plus one block).")
    ] = None,
    idle_lead: Annotated[
        float, typer.Option(min=0.05, help="Seconds ahead of playback blocks are made: enough to make a block "
                                           "(all sessions' blocks) in; less is a faster answer.")
    ] = 0.4,
    idle_timeout: Annotated[float, typer.Option(min=1, help="Close a session after this long without a message.")] = (
        300.0),
    allow_origin: Annotated[
        list[str] | None, typer.Option(help="Another page origin allowed to open WebSockets; repeatable.")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU intra-op threads of the engine thread (default: half the cores, "
                                             "at least one: the server's other threads share them).")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.auto,
    seed: Annotated[int, typer.Option(help="Seed of --random-weights.")] = 0,
) -> None:
    """Serve live avatars: audio in, synced avatar video out, multi-turn sessions that keep their
    visual memory. Open the printed URL in a browser, or drive it over the WebSocket API
    (`livetalk_cli.serve.client`). Ctrl-C stops it.
    """
    from livetalk_cli.serve.live import Pacing
    from livetalk_cli.serve.protocol import Limits

    with user_errors():
        try:
            from livetalk_cli.serve.app import ServerConfig, run_server
            from livetalk_cli.serve.responders import parse_responder
        except ImportError as e:
            raise UserError(f"serve-local needs the serving extra: pip install -e '.[serve]' ({e})") from None
        if token == "auto":
            token = secrets.token_urlsafe(16)
        config = ServerConfig(
            host=host, port=port, token=token, max_sessions=max_sessions, responder=parse_responder(responder),
            limits=Limits(idle_timeout_s=idle_timeout), pacing=Pacing(lead_s=lead, idle_lead_s=idle_lead),
            threads=threads, allow_origins=tuple(allow_origin or ()),
        )
        config.check()
        model = load_serving_model(checkpoint, preset, random_weights, device, dtype, seed, engine, engine_backend)
        query = f"?token={token}" if token else ""
        err.print(f"serving {model.cfg.name} ({model.source}) on http://{host}:{port}/{query}  "
                  f"responder: {config.responder.name}, up to {max_sessions} sessions; Ctrl-C stops",
                  highlight=False)
        run_server(model, config, log_level="info" if logging.getLogger().level <= logging.INFO else "warning")


def load_serving_model(checkpoint: Path | None, preset: object, random_weights: bool, device: str, dtype: DType,
                       seed: int, engine: Path | None, engine_backend: str) -> LoadedModel:
    """The model a server loads once (serve-local, bench --serve), engines attached when given."""
    from livetalk_cli.export.load import check_engine_args
    from livetalk_cli.pipeline import load_model, resolve_device, resolve_dtype

    if engine is not None:
        check_engine_args(engine, engine_backend, compile=False, cuda_graphs=False)
    dev = resolve_device(device)
    model = load_model(checkpoint=checkpoint, preset_name=getattr(preset, "value", None),
                       random_weights=random_weights, device=dev, dtype=resolve_dtype(dtype.value, dev), seed=seed)
    if engine is not None:
        from livetalk_cli.export.load import load_engines

        model.engines = load_engines(model, engine, engine_backend)
    return model


def bench_serve(checkpoint: Path | None, preset: object, random_weights: bool, device: str, dtype: DType,
                seed: int, threads: int | None, engine: Path | None, engine_backend: str, sessions: int,
                seconds: float, turns: int, minutes: float, json_out: Path | None) -> None:
    """`livetalk bench --serve` (the option parsing is bench's, in cli.py)."""
    from livetalk_cli.files import check_output_file, write_json_atomic

    with user_errors():
        try:
            from livetalk_cli.bench_serve import print_serve_bench, run_serve_bench
        except ImportError as e:
            raise UserError(f"bench --serve needs the serving extra: pip install -e '.[serve]' ({e})") from None
        if json_out is not None:
            check_output_file(json_out)
        model = load_serving_model(checkpoint, preset, random_weights, device, dtype, seed, engine, engine_backend)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("bench --serve", total=None)
            result = run_serve_bench(
                model, max_sessions=sessions, seconds=seconds, turns=turns, minutes=minutes, threads=threads,
                on_status=lambda text: progress.update(task, description=text, completed=0, total=None),
                on_progress=lambda done, total: progress.update(task, completed=done, total=total))
        if json_out is not None:
            write_json_atomic(json_out, result)
    print_serve_bench(result)
