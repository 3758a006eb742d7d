"""`livetalk bench`'s tables on the terminal, from the JSON-able result of `bench.run_bench`.

Laid out by `tables` for the console's width (80 when piped): numbers in columns, every note on
its own line under its row, wrapped at spaces only, so neither a note nor a number is ever cut.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from livetalk_cli.tables import Block, Column, Row, table_block, wrap


def bench_blocks(r: dict[str, Any], width: int) -> list[Block]:
    """The header, tables and memory lines of a bench result, laid out for `width` columns."""
    m, mod = r["machine"], r["model"]
    head = Block()
    for i, text in enumerate((
        f"{mod['name']} ({mod['source']})",
        f"{mod['height']}x{mod['width']} @ {mod['fps']} fps, {mod['dtype']} (VAE {mod['vae_dtype']})",
        f"{mod['steps']} steps + refill, blocks of {mod['block_frames']} latents, {mod['sink_frames']} sinks + "
        f"{mod['window_frames']} window",
        f"{m['device']}, torch {m['torch']}" + (f"; {_label(r['options'])}" if r["options"] else ""),
        *([f"engines {r['engine']['path']}: DiT {r['engine']['dit']}, VAE {r['engine']['vae']}"]
          if "engine" in r else []),
    )):
        for line in wrap(text, width, indent=0 if i == 0 else 2):
            head.add(line, "bold" if i == 0 else "")
    blocks = [head]

    def span(s: dict[str, float], fmt: str) -> list[str]:
        return [format(s["median"], fmt), format(s["min"], fmt), format(s["max"], fmt)]

    lb = r["latency_budget"]
    rows = [
        Row(["steady-state FPS", *span(r["fps"], ".2f")],
            [f"{r['realtime_factor']:.2f}x real time ({mod['fps']} fps)"]),
        Row(["first frame (s)", *span(r["first_frame_s"], ".3f")], ["stream start -> first generated frame on host"]),
    ]
    if "loaded" in r:
        ld = r["loaded"]
        note = f"beside {ld['busy_processes']} busy process(es) (--background-load)"
        rows += [
            Row(["  loaded FPS", *span(ld["fps"], ".2f")], [f"{ld['fps_vs_quiet']:.2f}x the quiet FPS, {note}"]),
            Row(["  loaded first frame (s)", *span(ld["first_frame_s"], ".3f")],
                [f"{ld['first_frame_vs_quiet']:.2f}x the quiet first frame"]),
        ]
    rows += [
        Row(["audio before start (s)", f"{lb['audio_before_first_block_s']:.3f}", "", ""],
            [f"algorithmic: block 0's frames + {lb['lookahead_s']:.3f} s look-ahead"]),
    ]
    if "flops" in r:
        fl = r["flops"]
        rows += [
            Row(["FLOP floor FPS", f"{fl['floor_fps']:.1f}", "", ""], [
                f"{(fl['dit_per_frame'] + fl['vae_decode_per_frame']) / 1e9:.3g} GFLOP/frame over "
                f"{fl['matmul_flop_per_s'] / 1e12:.3g} TFLOP/s matmul",
                f"{100 * fl['dit_attention_per_frame'] / fl['dit_per_frame']:.0f}% of the DiT's FLOPs in attention",
            ]),
            Row(["FLOP floor first frame (s)", f"{fl['floor_first_frame_s']:.4f}", "", ""],
                [f"{fl['first_frame'] / 1e9:.3g} GFLOP to the first frame"]),
        ]
    ref = r["reference"]
    rows.append(Row(["LiveTalk (published) FPS", f"{ref['fps']:.2f}", "", ""],
                    [f"first frame {ref['first_frame_s']:.2f} s; {ref['source']}"], style="dim"))
    blocks.append(table_block([Column("", "left"), Column("median"), Column("min"), Column("max")], rows, width,
                              title="throughput and latency"))

    if "stages_s" not in r:  # --speed-only
        return blocks
    total = sum(v["median"] for v in r["stages_s"].values())
    rows = [Row([name, *span(v, ".4f"), f"{100 * v['median'] / total:.0f}%"]) for name, v in r["stages_s"].items()]
    rows.append(Row(["sum", f"{total:.4f}", "", "", f"{lb['frames_per_block'] / total:.1f} FPS"], style="bold"))
    cols = [Column("stage", "left"), *(Column(c) for c in ("median", "min", "max", "share"))]
    blocks.append(table_block(cols, rows, width, title="per block, sequential eager, synchronised (s)"))

    if "compare" in r:
        rows = [Row([row["options"], f"{row['fps']['median']:.2f}", f"{row['fps_gain']:.2f}x",
                     f"{row['first_frame_s']['median']:.3f}", f"{row['first_frame_gain']:.2f}x"])
                for row in r["compare"]]
        cols = [Column("switches", "left"), *(Column(c) for c in ("FPS", "gain", "first frame (s)", "gain"))]
        blocks.append(table_block(cols, rows, width, title="optimisations (each row adds one); engines (a side "
                                                          "not named runs eager)"))

    blocks.append(_memory_block(r, width))
    return blocks


def _memory_block(r: dict[str, Any], width: int) -> Block:
    block = Block()
    block.add(f"peak memory {r['peak_memory_mb']:.0f} MB ({r['peak_memory_kind']})")
    mem = r.get("memory_stream")
    if mem:
        for line in wrap(f"{mem['minutes']:.1f}-minute stream: {mem['start_mb']:.0f} -> {mem['end_mb']:.0f} MB, "
                         f"range {mem['min_mb']:.0f}-{mem['max_mb']:.0f} MB", width):
            block.add(line)
        verdict = "flat" if mem["flat"] else "GROWING"
        block.add(f"  growth {mem['growth_mb']:+.1f} MB (tolerance {mem['tolerance_mb']:.0f} MB): {verdict}",
                  "green" if mem["flat"] else "bold red")
    return block


def print_bench(r: dict[str, Any], console: Console | None = None) -> None:
    """Print `bench_blocks` on `console` (default: stdout), for its width, a blank line between."""
    console = console or Console()
    for i, block in enumerate(bench_blocks(r, console.width)):
        if i:
            console.print()
        block.print(console)


def _label(options: dict[str, Any]) -> str:
    from livetalk_cli.runtime.stream import StreamOptions

    return StreamOptions(**options).label()
