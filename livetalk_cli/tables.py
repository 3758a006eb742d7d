"""Plain-text tables for the terminal and for pipes: `livetalk eval`'s scores (and its CSV), and
the layout `bench_table` uses.

Lines are laid out here for the console's width (80 when stdout is not a terminal) and printed
as they are: rich neither wraps nor cuts them, and draws no box characters. A terminal gets bold
headers and dim notes; a pipe gets the same text without escape codes. Cells are never cut: a
first-column label too long for its column goes on its own line above the row's numbers, and a
note goes on its own indented line below its row, wrapped at spaces only. A single word longer
than the width (a long file name) stays whole and overruns the width.
"""

from __future__ import annotations

import csv
import io
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.text import Text

GAP = 2  # spaces between columns
NOTE_INDENT = 4
ABSENT = "–"  # a value that is not reported (e.g. drift of a short video)


@dataclass(frozen=True)
class Column:
    header: str
    align: Literal["left", "right"] = "right"


@dataclass
class Row:
    cells: Sequence[str]
    notes: Sequence[str] = ()  # each on its own line(s) below the row
    style: str = ""


@dataclass
class Block:
    """Lines to print: text and the rich style of each."""

    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, text: str, style: str = "") -> None:
        self.lines.append((text.rstrip(), style))

    def print(self, console: Console) -> None:
        for text, style in self.lines:
            console.print(Text(text, style=style), soft_wrap=True)  # laid out already: no wrap, no crop

    def text(self) -> str:
        return "".join(f"{t}\n" for t, _ in self.lines)


def wrap(text: str, width: int, indent: int = 0, hanging: int = 2) -> list[str]:
    """`text` wrapped at spaces to `width`: first line indented by `indent`, the others by
    `indent + hanging`; words are never split (one longer than the width overruns it)."""
    return textwrap.wrap(
        text, width=max(1, width), initial_indent=" " * indent, subsequent_indent=" " * (indent + hanging),
        break_long_words=False, break_on_hyphens=False,
    ) or [""]


def table_block(
    columns: Sequence[Column], rows: Iterable[Row], width: int, title: str | None = None
) -> Block:
    """Lay out a table for `width` columns. The first column holds labels; the others are as
    wide as their widest cell or header and never shrink. The label column takes the width left
    over; a longer label goes on its own line, its numbers on the next line."""
    rows = list(rows)
    for row in rows:
        if len(row.cells) != len(columns):
            raise ValueError(f"row {row.cells!r} has {len(row.cells)} cells for {len(columns)} columns")
    widths = [max([len(c.header)] + [len(r.cells[i]) for r in rows]) for i, c in enumerate(columns)]
    rest = sum(widths[1:]) + GAP * (len(columns) - 1)
    widths[0] = max(len(columns[0].header), min(widths[0], width - rest))

    def line(cells: Sequence[str]) -> str:
        parts = [c.ljust(w) if col.align == "left" else c.rjust(w)
                 for c, w, col in zip(cells, widths, columns, strict=True)]
        return (" " * GAP).join(parts)

    block = Block()
    if title:
        for t in wrap(title, width):
            block.add(t, "bold")
    block.add(line([c.header for c in columns]), "bold")
    for row in rows:
        label, *values = row.cells
        if len(label) > widths[0]:
            block.add(label, row.style)
            label = ""
        block.add(line([label, *values]), row.style)
        for note in row.notes:
            for t in wrap(note, width, indent=NOTE_INDENT):
                block.add(t, "dim")
    return block


# ------------------------------------------------------------------------------------ livetalk eval

EVAL_COLUMNS = (
    Column("video", "left"), Column("lip-sync"), Column("offset"), Column("identity"), Column("flicker"),
    Column("black%"), Column("frozen%"), Column("drift/min"),
)
# One CSV row per video: these result fields, in this order (absent values are empty).
CSV_FIELDS = (
    "video", "reference", "fps", "frames", "seconds", "lip_sync_corr", "lip_sync_offset", "lip_sync_corr_at_zero",
    "identity_error", "flicker", "black_frames", "frozen_frames", "drift_per_min", "drift_window_s",
)


def _drift(value: float | None) -> str:
    return ABSENT if value is None else f"{value:+.4f}"


def _eval_cells(name: str, r: dict[str, Any], offset: str) -> list[str]:
    return [
        name, f"{r['lip_sync_corr']:.3f}", offset, f"{r['identity_error']:.4f}", f"{r['flicker']:.2f}",
        f"{100 * r['black_frames']:.1f}", f"{100 * r['frozen_frames']:.1f}", _drift(r["drift_per_min"]),
    ]


def eval_block(results: Sequence[dict[str, Any]], mean: dict[str, Any] | None, width: int) -> Block:
    """`livetalk eval`'s table: a row per video (its file name, whole), then the `mean` row if
    given, and a note on the drift of videos too short to have one."""
    rows = [Row(_eval_cells(Path(r["video"]).name, r, f"{r['lip_sync_offset']:+d}")) for r in results]
    if mean:
        rows.append(Row(_eval_cells("mean", mean, f"{mean['lip_sync_offset']:+.1f}"), style="bold"))
    block = table_block(EVAL_COLUMNS, rows, width)
    short = [r for r in results if r["drift_per_min"] is None]
    if short:
        need = max(float(r["drift_min_s"]) for r in short)
        note = f"{ABSENT} drift: shorter than {need:g} s of video, too short for a trend"
        if mean and len(short) < len(results):
            note += f"; the mean's drift is over the {len(results) - len(short)} video(s) that have one"
        for t in wrap(note, width, hanging=len(ABSENT) + 1):
            block.add(t, "dim")
    return block


WINDOW_COLUMNS = (Column("window", "left"), Column("lip-sync"), Column("offset"), Column("identity"),
                  Column("flicker"))


def windows_block(results: Sequence[dict[str, Any]], mean: dict[str, Any] | None, width: int) -> Block | None:
    """`livetalk eval --windows`: a row per window — the video's, or with several videos their mean
    (the offset's mean then has one decimal) — and the worst window of any video; None without windows."""
    several = mean is not None and "windows" in mean
    rows_in = mean["windows"] if several else results[0].get("windows") if len(results) == 1 else None
    if not rows_in:
        return None
    rows = []
    for w in rows_in:
        offset = f"{w['lip_sync_offset']:+.1f}" if several else f"{w['lip_sync_offset']:+d}"
        rows.append(Row([f"{w['start_s']:g}-{w['start_s'] + w['seconds']:g} s", f"{w['lip_sync_corr']:.3f}", offset,
                         f"{w['identity_error']:.4f}", f"{w['flicker']:.2f}"]))
    title = "per window, mean over the videos" if several else "per window"
    block = table_block(WINDOW_COLUMNS, rows, width, title=title)
    if several:
        worst = min((w["lip_sync_corr"], Path(r["video"]).name, w["start_s"]) for r in results
                    for w in r.get("windows", []))
        for t in wrap(f"lowest window lip-sync: {worst[0]:.3f} ({worst[1]}, from {worst[2]:g} s)", width):
            block.add(t, "dim")
    return block


def print_eval(
    results: Sequence[dict[str, Any]], mean: dict[str, Any] | None = None, console: Console | None = None
) -> None:
    """Print `eval_block` on `console` (default: stdout), for its width, then `windows_block`."""
    console = console or Console()
    eval_block(results, mean, console.width).print(console)
    win = windows_block(results, mean, console.width)
    if win is not None:
        console.print()
        win.print(console)


def eval_csv(results: Sequence[dict[str, Any]]) -> str:
    """CSV_FIELDS of every result, a header line first; numbers in full precision."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in results:
        writer.writerow(["" if r.get(k) is None else r[k] for k in CSV_FIELDS])
    return out.getvalue()
