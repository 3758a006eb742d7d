"""A deliberate background load for measurements: N busy processes, one core's worth each.

`livetalk bench --background-load N` measures the first frame and FPS again while they run, as
on a laptop that is doing other things. The same load by hand (one line per busy core):
`python -c "while True: pass" &` (stop it with `kill %1` or `pkill -f "while True: pass"`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

BUSY_LOOP = "while True: pass"


@contextmanager
def busy_processes(n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Run the block while `n` processes spin on the CPU; they are killed when it ends."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]
    try:
        time.sleep(0.3)  # let them start spinning
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
