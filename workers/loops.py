"""What the long-lived loops of a worker met: a fault is logged, counted, shown, then outlived.

A worker runs for months unattended, so none of its loops (discovery, claim and analysis, the
heartbeat, the exporter) may end on an exception it did not foresee: each catches whatever its
iteration raised, reports it here, waits with a growing pause (:class:`Backoff`) and goes on;
only the stop it was asked for ends it. :meth:`LoopHealth.trouble` is what ``/health`` says
while a loop keeps failing (``alphawatch up``); the log has every failure, with the traceback
of the first of each streak.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("alphawatch.worker")


class Backoff:
    """A pause that doubles from ``first_s`` to ``max_s`` while failures follow each other."""

    def __init__(self, first_s: float = 0.5, max_s: float = 30.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.delay = first_s

    def next(self) -> float:
        """The pause to take now; the next one is twice as long."""
        delay = self.delay
        self.delay = min(self.delay * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self.delay = self.first_s


@dataclass
class _Streak:
    since: str  # wall-clock time of the streak's first failure, for operators
    count: int
    last: str


class LoopHealth:
    """Failures of a worker's loops by loop name: totals, and the streak each one is in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streaks: dict[str, _Streak] = {}
        self.errors: dict[str, int] = {}  # every failure since the worker started, by loop

    def failed(self, loop: str, exc: BaseException, retry_in: float) -> None:
        """Record (and log) a failure of ``loop``, which goes on after ``retry_in`` seconds."""
        what = f"{type(exc).__name__}: {exc}"[:1000]
        with self._lock:
            self.errors[loop] = self.errors.get(loop, 0) + 1
            streak = self._streaks.get(loop)
            if streak is None:
                streak = self._streaks[loop] = _Streak(time.strftime("%H:%M:%S"), 0, what)
            streak.count += 1
            streak.last = what
            first = streak.count == 1
        if first:
            log.error("%s failed; going on in %.1fs", loop, retry_in, exc_info=exc)
        else:
            log.error(
                "%s failed again (%d times in a row): %s; going on in %.1fs",
                loop,
                streak.count,
                what,
                retry_in,
            )

    def ok(self, loop: str) -> None:
        """``loop`` completed an iteration: its streak of failures, if any, is over."""
        with self._lock:
            streak = self._streaks.pop(loop, None)
        if streak is not None:
            log.info("%s works again after %d failures", loop, streak.count)

    def forget(self, loop: str) -> None:
        """``loop`` ended (a heartbeat with its job): its streak, if any, is no longer news."""
        with self._lock:
            self._streaks.pop(loop, None)

    def trouble(self) -> str | None:
        """Why a loop is failing now (the first such loop), or None when none is."""
        with self._lock:
            for loop, streak in self._streaks.items():
                return (
                    f"{loop} failing since {streak.since} ({streak.count} times in a row; "
                    f"last: {streak.last})"
                )[:2000]
        return None
