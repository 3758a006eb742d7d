"""The engine thread: the one thread that runs the model, for every session, earliest deadline first.

The model is loaded once and each session owns its runtime stream (KV cache, VAE cache, noise), so
sessions share weights and nothing else. One thread runs every session's work (start, then blocks)
in order of the deadline of its next frame (`LiveSession.plan`): a speaking session's block before
an idle one's that is due later, and no session waits behind a stalled client (the engine only
hands frames to the connection, which drops them when its client does not keep up).

On a CPU this thread runs half the intra-op threads by default (at least one): the rest of the
server (event loop, JPEG and WebRTC encoding, responders) shares the cores, and an OpenMP team
that spans every core stalls at each barrier whenever one of them is taken (`runtime.threads`).
Measured with three demo sessions on the 2-vCPU Xeon: blocks of 12 frames took 0.20-0.34 s with a
2-thread team and 0.17-0.19 s with one thread (occasional 0.34 s in both). On a GPU the thread
keeps the device busy with one stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from livetalk_cli.runtime.threads import total_threads
from livetalk_cli.serve.live import LiveSession

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, *, threads: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.sessions: list[LiveSession] = []
        self.cond = threading.Condition()
        self.clock = clock
        self.threads = threads if threads else max(1, total_threads(None) // 2)  # CPU intra-op threads
        self.busy_s = 0.0  # time spent in work, for the load figure in stats
        self.started_at = clock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="livetalk-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify()
        self._thread.join()
        for s in self.sessions:
            s.close()
        self.sessions.clear()

    def add(self, session: LiveSession) -> None:
        with self.cond:
            self.sessions.append(session)
            self.cond.notify()

    def remove(self, session: LiveSession) -> None:
        """Mark the session closed; the engine thread drops it (and frees it) before its next pick."""
        session.closed = True
        self.wake()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        with torch.no_grad():
            while True:
                with self.cond:
                    if self._stop:
                        return
                    self._drop_closed()
                    session, wait = self._pick(self.clock())
                    if session is None:
                        self.cond.wait(timeout=wait)
                        continue
                t = time.perf_counter()
                try:
                    session.work()
                except Exception as e:  # one session's failure must not stop the others
                    log.warning("session %s failed: %s", session.id, e, exc_info=log.isEnabledFor(logging.DEBUG))
                    session.emit("event", {"type": "error", "code": "engine",
                                           "message": f"the session stopped: {type(e).__name__}: {e}"})
                    session.emit("close", None)
                    session.closed = True
                self.busy_s += time.perf_counter() - t
                del session  # the engine keeps no reference to a session between picks

    def _drop_closed(self) -> None:
        """Closed sessions leave the engine here (a method: no loop variable keeps the last one alive)."""
        for s in [s for s in self.sessions if s.closed]:
            self.sessions.remove(s)
            s.close()

    def _pick(self, now: float) -> tuple[LiveSession | None, float]:
        """The due session with the earliest deadline, or None and how long to wait."""
        best, best_deadline, wake = None, float("inf"), 0.25
        backlog = sum(s.stats.block_cost_s for s in self.sessions if not s.closed)
        for s in self.sessions:
            plan = s.plan(now, backlog)
            if plan is None:
                continue
            when, deadline = plan
            if when <= now:
                if deadline < best_deadline:
                    best, best_deadline = s, deadline
            else:
                wake = min(wake, when - now)
        return best, max(wake, 0.001)

    def load(self) -> float:
        """Fraction of the time since start the engine thread spent working."""
        return self.busy_s / max(1e-9, self.clock() - self.started_at)
