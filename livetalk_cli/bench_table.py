"""`livetalk bench`'s tables on the terminal, from the JSON-able result of `bench.run_bench`."""

from __future__ import annotations

from rich.console import Console


def print_bench(r: dict) -> None:
    from rich import box
    from rich.table import Table

    out = Console()
    m, mod = r["machine"], r["model"]
    out.print(
        f"[bold]{mod['name']}[/] ({mod['source']}), {mod['height']}x{mod['width']} @ {mod['fps']} fps, "
        f"{mod['dtype']} (VAE {mod['vae_dtype']}), {mod['steps']} steps + refill, blocks of {mod['block_frames']} "
        f"latents, {mod['sink_frames']} sinks + {mod['window_frames']} window; {m['device']}, torch {m['torch']}; "
        f"{r['options'] and _label(r['options'])}",
        highlight=False,
    )

    def span(s: dict, fmt: str) -> list[str]:
        return [format(s["median"], fmt), format(s["min"], fmt), format(s["max"], fmt)]

    t = Table(box=box.SIMPLE_HEAD, title="throughput and latency")
    for c in ("", "median", "min", "max", "note"):
        t.add_column(c, justify="left" if c in ("", "note") else "right")
    t.add_row("steady-state FPS", *span(r["fps"], ".2f"), f"{r['realtime_factor']:.2f}x real time ({mod['fps']} fps)")
    t.add_row("first frame (s)", *span(r["first_frame_s"], ".3f"), "stream start -> first generated frame on host")
    lb = r["latency_budget"]
    t.add_row("audio before start (s)", f"{lb['audio_before_first_block_s']:.3f}", "", "",
              f"algorithmic: block 0's frames + {lb['lookahead_s']:.3f} s look-ahead")
    if "flops" in r:
        fl = r["flops"]
        t.add_row("FLOP floor FPS", f"{fl['floor_fps']:.1f}", "", "",
                  f"{(fl['dit_per_frame'] + fl['vae_decode_per_frame']) / 1e9:.3g} GFLOP/frame "
                  f"({100 * fl['dit_attention_per_frame'] / fl['dit_per_frame']:.0f}% of the DiT's in attention) "
                  f"over {fl['matmul_flop_per_s'] / 1e12:.3g} TFLOP/s matmul")
        t.add_row("FLOP floor first frame (s)", f"{fl['floor_first_frame_s']:.4f}", "", "",
                  f"{fl['first_frame'] / 1e9:.3g} GFLOP to the first frame")
    ref = r["reference"]
    t.add_row("LiveTalk (published)", f"{ref['fps']:.2f} FPS", f"{ref['first_frame_s']:.2f} s", "", ref["source"],
              style="dim")
    out.print(t)

    if "stages_s" not in r:  # --speed-only
        return
    st = Table(box=box.SIMPLE_HEAD, title="per block, sequential eager, synchronised (s)")
    for c in ("stage", "median", "min", "max", "share"):
        st.add_column(c, justify="left" if c == "stage" else "right")
    total = sum(v["median"] for v in r["stages_s"].values())
    for name, v in r["stages_s"].items():
        st.add_row(name, *span(v, ".4f"), f"{100 * v['median'] / total:.0f}%")
    st.add_row("sum", f"{total:.4f}", "", "", f"{lb['frames_per_block'] / total:.1f} FPS", style="bold")
    out.print(st)

    if "compare" in r:
        ct = Table(box=box.SIMPLE_HEAD, title="optimisations (each row adds one)")
        for c in ("switches", "FPS", "gain", "first frame (s)", "gain"):
            ct.add_column(c, justify="left" if c == "switches" else "right")
        for row in r["compare"]:
            ct.add_row(row["options"], f"{row['fps']['median']:.2f}", f"{row['fps_gain']:.2f}x",
                       f"{row['first_frame_s']['median']:.3f}", f"{row['first_frame_gain']:.2f}x")
        out.print(ct)

    mem = r.get("memory_stream")
    line = f"peak memory {r['peak_memory_mb']:.0f} MB ({r['peak_memory_kind']})"
    if mem:
        line += (f"; {mem['minutes']:.1f}-minute stream: {mem['start_mb']:.0f} -> {mem['end_mb']:.0f} MB "
                 f"(range {mem['min_mb']:.0f}-{mem['max_mb']:.0f}; growth {mem['growth_mb']:+.1f} MB, "
                 f"tolerance {mem['tolerance_mb']:.0f}) "
                 + ("[green]flat[/]" if mem["flat"] else "[red]GROWING[/]"))
    out.print(line, highlight=False)


def _label(options: dict) -> str:
    from livetalk_cli.runtime.stream import StreamOptions

    return StreamOptions(**options).label()
