"""Analysing checkpoints in a child process held to a wall-clock and a memory budget.

A checkpoint is hostile input: a pickle graph that explodes when loaded, a header that lies, or a
model that is simply too large for the machine. The worker therefore never analyses in its own
process. A long-lived child (``python -m alphawatch.workers.budget``) imports the engine once
and analyses one checkpoint per request (safetensors checkpoints on a CPU need no torch; the
first pickle, DCP folder or CUDA device imports it, once); the worker keeps the database, the
lease and the heartbeat, and watches the child: past ``timeout_s`` of wall-clock time, or past
``memory_mb`` of resident anonymous memory, the child is killed and the job fails with a message
saying which budget it broke. A child that dies on its own (the kernel's OOM killer, a crash in
native code) is reported the same way. The next job gets a fresh child; a healthy child serves
job after job, so the imports are paid once, not per checkpoint.

What passes between them is typed: the worker sends the :class:`AnalysisOptions` once, then an
:class:`AnalyseRequest` per checkpoint; the child answers :class:`ChildReady` (or
:class:`ChildRefused`), then an :class:`Analysis` or an :class:`AnalysisFailure` per request.

Memory is read from ``/proc/<pid>/status`` (``RssAnon`` + ``RssShmem``) every ``POLL_S``:
``RLIMIT_AS`` would count torch's address-space reservations and the memory-mapped checkpoint
files, and break large legitimate checkpoints long before the budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alphawatch.locations import ObjectURL
from alphawatch.text import EscapingFormatter
from alphawatch.workers.analyst import Analysis, AnalysisOptions
from alphawatch.workers.checkpoints.skeleton import OFFLINE_ENVIRONMENT

if TYPE_CHECKING:
    from alphawatch.settings import Settings

log = logging.getLogger("alphawatch.worker")

# Often enough that a runaway allocation overshoots by at most ~POLL_S x its rate (a few hundred
# MB at memory bandwidth), rarely enough to cost nothing measurable (bench/bench_budget.py).
POLL_S = 0.02
START_TIMEOUT_S = 300.0


class BudgetExceeded(Exception):
    """The analysis ran past its time or memory budget and was stopped."""


class ChildDied(Exception):
    """The analysis process died on its own: killed by the kernel (out of memory) or a crash."""


class Cancelled(Exception):
    """The analysis was stopped because the worker was told to stop (not the checkpoint's fault)."""


class AnalysisFailed(Exception):
    """The analysis raised an error in the child; ``vanished`` when the checkpoint was deleted."""

    def __init__(self, message: str, *, vanished: bool = False) -> None:
        super().__init__(message)
        self.vanished = vanished


@dataclass(frozen=True)
class Budget:
    """What one checkpoint's analysis may use: wall-clock seconds and resident MiB."""

    timeout_s: float
    memory_mb: float


@dataclass(frozen=True, slots=True)
class AnalyseRequest:
    """Worker to child: analyse the checkpoint at ``path``.

    ``first`` is the run's first checkpoint (distance from init) and ``prev`` the checkpoint
    before by step (update spectra, layer distances), ``newest`` whether no later checkpoint of
    the run is known: found by the worker so that the child never asks the database.
    """

    path: Path | ObjectURL
    first: Path | ObjectURL | None
    prev: Path | ObjectURL | None = None
    newest: bool = True


@dataclass(frozen=True, slots=True)
class ChildReady:
    """Child to worker: the engine is imported; it computes on ``device``."""

    device: str


@dataclass(frozen=True, slots=True)
class ChildRefused:
    """Child to worker: the options could not be used; ``error`` says why."""

    error: str


@dataclass(frozen=True, slots=True)
class AnalysisFailure:
    """Child to worker: the analysis raised ``error``; ``vanished``: the checkpoint was deleted."""

    error: str
    vanished: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """One analysed checkpoint, the device that computed it, and what it cost."""

    analysis: Analysis
    device: str
    elapsed_s: float
    peak_mb: float


def default_memory_mb() -> float:
    """Three quarters of the memory this worker may use: the machine's, or its container's."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    with contextlib.suppress(OSError, ValueError):
        # cgroup v2: a container's limit, where the kernel would OOM-kill long before MemTotal.
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit) / 2**20)
    return total * 0.75


def resident_mb(pid: int) -> float | None:
    """Anonymous resident memory of a process in MiB; None when it is gone.

    File-backed pages (the checkpoint's own memory-mapped bytes, shared libraries) are left out:
    the kernel can drop them at any time, so they are no memory the analysis holds.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            kib = 0
            for line in status:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    kib += int(line.split()[1])
            return kib / 1024
    except (OSError, ValueError):
        return None


class AnalysisChild:
    """The worker's handle on its analysis process, started on first use and after each death.

    Args:
        options: how to analyse, sent to each new child (see ``AnalysisOptions.from_settings``).
        budget: the time and memory budget of one checkpoint.
    """

    def __init__(self, options: AnalysisOptions, budget: Budget) -> None:
        self.options = options
        self.budget = budget
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self.device = ""
        self.starts = 0
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the child (if none is running) and wait until it has imported the engine."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self.close()
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "alphawatch.workers.budget", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                close_fds=True,
                # Set before the child imports anything of the hub's: hostile input is read
                # there, and nothing in it may reach the network.
                env={**os.environ, **OFFLINE_ENVIRONMENT},
            )
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        self._proc, self._conn = proc, conn
        self._finalizer = weakref.finalize(self, _stop, proc, conn)
        self.starts += 1
        conn.send(self.options)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not conn.poll(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the analysis process could not start; see its errors above")
        answer = conn.recv()
        if not isinstance(answer, ChildReady):
            self.close()
            raise RuntimeError(f"the analysis process could not start: {_why(answer)}")
        self.device = answer.device

    def analyze(
        self,
        path: Path | ObjectURL,
        first: Path | ObjectURL | None,
        prev: Path | ObjectURL | None = None,
        *,
        newest: bool = True,
        cancel: Callable[[], bool] | None = None,
    ) -> Outcome:
        """Analyse one checkpoint within the budget.

        Args:
            path: the checkpoint.
            first: the run's first checkpoint (for distances from it), or None.
            prev: the checkpoint before by step (update spectra, layer distances), or None.
            newest: no later checkpoint of the run is known (it will be the next one's prev).
            cancel: asked every ``POLL_S``; once it answers True the child is killed and
                :class:`Cancelled` raised.

        Raises:
            Cancelled: ``cancel`` answered True (the child was killed).
            BudgetExceeded: past the time or memory budget (the child was killed).
            ChildDied: the child died on its own.
            AnalysisFailed: the analysis raised an error (the checkpoint's fault).
        """
        self.start()
        proc, conn = self._proc, self._conn
        assert proc is not None and conn is not None
        started = time.monotonic()
        deadline = started + self.budget.timeout_s
        peak = resident_mb(proc.pid) or 0.0
        try:
            conn.send(AnalyseRequest(path, first, prev, newest))
        except OSError:  # it died while idle, after start() looked
            raise self._died(path) from None
        while True:
            if cancel is not None and cancel():
                self.close()
                raise Cancelled(f"{path}: the analysis was stopped: the worker is stopping")
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise BudgetExceeded(
                    f"{path}: analysis exceeded the time budget of {self.budget.timeout_s:g} s "
                    f"(ALPHAWATCH_JOB_TIMEOUT_S) and was stopped"
                )
            if conn.poll(min(POLL_S, left)):
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    raise self._died(path) from None
                break
            rss = resident_mb(proc.pid)
            if rss is None or proc.poll() is not None:
                raise self._died(path)
            peak = max(peak, rss)
            if rss > self.budget.memory_mb:
                self.close()
                raise BudgetExceeded(
                    f"{path}: analysis exceeded the memory budget of {self.budget.memory_mb:g} MB "
                    f"(ALPHAWATCH_JOB_MEMORY_MB): it held {rss:.0f} MB when it was stopped"
                )
        elapsed = time.monotonic() - started
        if isinstance(reply, AnalysisFailure):
            raise AnalysisFailed(reply.error, vanished=reply.vanished)
        if not isinstance(reply, Analysis):
            self.close()
            raise AnalysisFailed(f"{path}: the analysis process answered {_why(reply)}")
        after = resident_mb(proc.pid) or 0.0
        if after > self.budget.memory_mb / 2:
            # Freed memory the allocator kept would shrink the next checkpoint's headroom.
            self.close()
        return Outcome(reply, self.device, elapsed, max(peak, after))

    def _died(self, path: Path | ObjectURL) -> ChildDied:
        proc = self._proc
        code = None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(timeout=5)
        self.close()
        if code is None:
            return ChildDied(f"{path}: the analysis process stopped answering and was stopped")
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            why = " (killed by the kernel: out of memory?)" if -code == signal.SIGKILL else ""
            return ChildDied(f"{path}: the analysis process died of {name}{why}")
        return ChildDied(f"{path}: the analysis process exited with status {code}")

    def close(self) -> None:
        """Stop the child (killed if busy) and reap it."""
        if self._finalizer is not None:
            self._finalizer()
        self._proc = self._conn = self._finalizer = None


def _why(answer: object) -> str:
    if isinstance(answer, ChildRefused):
        return answer.error
    # Both ends are this module: anything else is a fault of the worker, not of a checkpoint.
    return f"an unexpected {type(answer).__name__}"


def _stop(proc: subprocess.Popen[bytes], conn: Connection) -> None:
    with contextlib.suppress(OSError):
        conn.close()
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


# -- the child --------------------------------------------------------------------------------
def _die_with_parent() -> None:
    # A worker killed with SIGKILL cannot stop its child; the kernel does it (Linux only).
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def serve(conn: Connection) -> None:
    """Answer analysis requests until the worker closes the connection."""
    from alphawatch.workers.analyst import analyze_checkpoint
    from alphawatch.workers.checkpoints import CheckpointVanished

    try:
        # Built by the worker, confinement roots resolved there: the child reads under exactly
        # the same folders, with the same thresholds, as the worker was told.
        options = conn.recv()
        if not isinstance(options, AnalysisOptions):
            raise TypeError(f"expected AnalysisOptions, got {type(options).__name__}")
    except (EOFError, OSError):
        return
    except Exception as exc:  # options the child cannot even unpickle: the worker hears why
        conn.send(ChildRefused(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(ChildReady(str(options.device)))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        assert isinstance(request, AnalyseRequest), type(request)
        try:
            analysis = analyze_checkpoint(
                request.path, request.first, options, prev=request.prev, newest=request.newest
            )
        except CheckpointVanished as exc:
            conn.send(AnalysisFailure(str(exc), vanished=True))
        except Exception as exc:  # one bad checkpoint must never stop the child
            log.debug("analysis of %s failed", request.path, exc_info=True)
            conn.send(AnalysisFailure(f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(analysis)
            del analysis


def _first_to_go_out_of_memory() -> None:
    # Under memory pressure the kernel kills the analysis, which the worker reports and survives,
    # rather than the worker holding the lease (raising one's own score needs no privilege).
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as handle:
        handle.write("500")


def main(argv: list[str]) -> int:
    _die_with_parent()
    _first_to_go_out_of_memory()
    # The worker handles SIGINT/SIGTERM and stops the child itself, after its job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # As the worker's (alphawatch.cli): names from a run directory never print raw.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    serve(Connection(int(argv[0])))
    return 0


def budget_of(settings: Settings) -> Budget:
    """The budget of one job, from the worker's settings (memory 0: three quarters of RAM)."""
    return Budget(
        timeout_s=settings.job_timeout_s, memory_mb=settings.job_memory_mb or default_memory_mb()
    )


if __name__ == "__main__":
    # Served by the module under its own name, not as __main__: the worker unpickles the
    # messages this process sends as alphawatch.workers.budget's classes.
    from alphawatch.workers import budget

    sys.exit(budget.main(sys.argv[1:]))
