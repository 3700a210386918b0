"""Keeping the worker of ``alphawatch up`` alive: restart its thread when it dies, and say so.

``alphawatch up`` runs the API and one worker in one process. The worker's loops outlive
their faults themselves (a bad checkpoint is a recorded failure; a database that answers with
errors, or a bug, is logged and retried after a pause: ``workers.loops``), and while one keeps
failing :meth:`Supervisor.liveness` gives its reason, which ``/health`` turns into a 503. Should
the loop still end, the supervisor restarts it with a growing pause, and gives the reason until
the restarted loop completes a whole pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("alphawatch.worker")


class Supervisor:
    """Runs ``loop(stop)`` in a daemon thread and restarts it whenever it raises.

    Args:
        loop: the worker loop; it returns when ``stop`` is set.
        passes: how many whole passes the loop has completed (rises while it is healthy).
        stop: set to end the loop and the supervisor.
        trouble: why the running loop is failing now (it goes on, retrying), or None; shown
            as ``/health``'s reason like a dead loop's.
        first_pause_s: pause before the first restart; doubled after each failure that came
            quickly, up to ``max_pause_s``, and reset after a loop that lived a while.
    """

    def __init__(
        self,
        loop: Callable[[threading.Event], None],
        passes: Callable[[], int],
        stop: threading.Event,
        *,
        first_pause_s: float = 1.0,
        max_pause_s: float = 30.0,
        trouble: Callable[[], str | None] | None = None,
    ) -> None:
        self._loop = loop
        self._trouble = trouble
        self._passes = passes
        self._stop = stop
        self._first_pause_s = first_pause_s
        self._max_pause_s = max_pause_s
        self._lock = threading.Lock()
        self._down: str | None = None
        self._passes_when_down = 0
        self.restarts = 0
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def liveness(self) -> str | None:
        """None while the worker runs; else why it does not (for ``/health``)."""
        with self._lock:
            if self._down is not None and self._passes() > self._passes_when_down:
                log.info("worker is running again after %d restarts", self.restarts)
                self._down = None
            if self._down is None and not self._thread.is_alive() and not self._stop.is_set():
                return "the worker thread is not running"
            if self._down is None and self._trouble is not None:
                return self._trouble()
            return self._down

    def _run(self) -> None:
        pause = self._first_pause_s
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._loop(self._stop)
            except Exception as exc:  # whatever ended the loop, the API process goes on
                log.exception("the worker stopped; restarting it in %.0fs", pause)
                with self._lock:
                    self._down = (
                        f"worker down since {time.strftime('%H:%M:%S')} "
                        f"({type(exc).__name__}: {exc}); restarting"
                    )[:2000]
                    self._passes_when_down = self._passes()
            else:
                return  # stop was set
            if time.monotonic() - started > 10 * self._max_pause_s:
                pause = self._first_pause_s  # it ran a long while: a new fault, not the same
            if self._stop.wait(pause):
                return
            self.restarts += 1
            pause = min(pause * 2, self._max_pause_s)
