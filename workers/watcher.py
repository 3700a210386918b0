"""The watcher loop: discover checkpoints, claim them, analyse them, write the results.

Polling, not inotify: training clusters keep checkpoints on network filesystems where change
notifications do not arrive. Every step that touches the database is short and retried with
backoff when the database is unreachable; the analysis itself runs outside any transaction,
with a heartbeat thread keeping the job's lease alive.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, OperationalError

from alphawatch.service.db import queue
from alphawatch.service.db.models import Run
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.workers.checkpoints import (
    CheckpointError,
    CheckpointVanished,
    Confinement,
    discover,
    iter_layers,
)
from alphawatch.workers.checkpoints.discovery import fingerprint
from alphawatch.workers.checkpoints.errors import printable, shown
from alphawatch.workers.spectral import analyze_matrix, resolve_device

log = logging.getLogger("alphawatch.worker")
T = TypeVar("T")


class RunDirError(ValueError):
    """A run directory that does not exist or cannot be read."""


def check_run_dir(path: Path) -> Path:
    """Resolve ``path`` and fail with a clear message when it cannot be watched."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise RunDirError(f"run directory {resolved} does not exist")
    if not resolved.is_dir() and not resolved.is_file():
        raise RunDirError(f"{resolved} is neither a directory nor a checkpoint file")
    if not os.access(resolved, os.R_OK | (os.X_OK if resolved.is_dir() else 0)):
        raise RunDirError(f"run directory {resolved} cannot be read by this user")
    return resolved


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Heartbeat(threading.Thread):
    """Renews a job's lease until stopped; records when the lease was lost."""

    def __init__(self, watcher: Watcher, job_id: int) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.watcher = watcher
        self.job_id = job_id
        self.stop_event = threading.Event()
        self.lost = False

    def run(self) -> None:
        settings = self.watcher.settings
        while not self.stop_event.wait(settings.heartbeat_s):
            try:
                with session_scope(self.watcher.engine) as session:
                    alive = queue.heartbeat(
                        session, job_id=self.job_id, worker_id=self.watcher.worker_id,
                        lease_s=settings.lease_s,
                    )
            except (OperationalError, DBAPIError) as exc:
                # A missed beat is not a lost lease: the lease outlives a few heartbeats.
                log.warning("heartbeat failed for job %s: %s", self.job_id, exc)
                continue
            if not alive:
                self.lost = True
                log.warning("lease of job %s was lost to another worker", self.job_id)
                return


class Watcher:
    """One worker: polls run directories and processes analysis jobs from the queue.

    Args:
        settings: database URL, device, thresholds, poll interval, lease and heartbeat.
        run_dirs: directories (or single checkpoint files) to discover checkpoints in; runs
            registered through the API are watched as well.
        worker_id: name of this worker in job leases; host:pid:random by default.
        reanalyze: queue checkpoints already analysed once more.
    """

    def __init__(
        self,
        settings: Settings,
        run_dirs: Iterable[Path] = (),
        *,
        worker_id: str | None = None,
        reanalyze: bool = False,
    ) -> None:
        self.settings = settings
        self.run_dirs = [check_run_dir(Path(p)) for p in run_dirs]
        # The folders named on the command line are allowed, besides ALPHAWATCH_ALLOWED_ROOTS:
        # naming a folder to watch is allowing it. Nothing else is, whatever a symlink says.
        self.confine = Confinement.to([*settings.allowed_roots, *self.run_dirs])
        self.worker_id = worker_id or default_worker_id()
        self.reanalyze = reanalyze
        self.engine = make_engine(settings.database_url)
        self.device = resolve_device(settings.device)
        self.thresholds = settings.trust
        self._reanalyzed: set[int] = set()
        # Discovery passes completed; a supervisor reads it to see that the loop is live.
        self.passes = 0
        # A live line per layer on a terminal; plain log records when stderr is a file or pipe.
        self.progress = sys.stderr.isatty()

    # -- database access with retry -------------------------------------------------------
    def _retry(self, what: str, fn: Callable[[], T], stop: threading.Event | None = None) -> T:
        delay = 0.5
        while True:
            try:
                return fn()
            except (OperationalError, DBAPIError) as exc:
                if not _is_connection_error(exc):
                    raise
                log.warning("database unreachable during %s (%s); retrying in %.1fs",
                            what, type(exc.orig or exc).__name__, delay)
                if stop is not None and stop.wait(delay):
                    raise
                if stop is None:
                    time.sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- discovery ---------------------------------------------------------------------------
    def _watched_dirs(self) -> list[Path]:
        with session_scope(self.engine) as session:
            registered = [Path(p) for p in session.scalars(select(Run.path))]
        seen: dict[Path, None] = dict.fromkeys(self.run_dirs)
        for path in registered:
            # A registered run whose folder is gone is skipped; one that now leads outside the
            # roots (or cannot be looked at) is kept, so discovery records why on the run.
            try:
                present = path.exists() or path.is_symlink()
            except (OSError, ValueError):
                present = True
            if present:
                seen.setdefault(path, None)
        return list(seen)

    def discover_once(self) -> int:
        """Register every complete checkpoint found; returns how many were new.

        Nothing found in a run directory ends the pass: a run that cannot be listed, and each
        entry discovery refuses, is recorded on the run or on the checkpoint (``discovery_error``)
        and the other runs and checkpoints go on. Only an unreachable database is raised, for
        the caller to retry.
        """
        new = 0
        for run_dir in self._watched_dirs():
            try:
                new += self._discover_run(run_dir)
            except (OperationalError, DBAPIError) as exc:
                if _is_connection_error(exc):
                    raise
                self._record_run_error(run_dir, exc)
            except Exception as exc:  # one run, whatever its folder holds, never ends the worker
                self._record_run_error(run_dir, exc)
        return new

    def _record_run_error(self, run_dir: Path, exc: Exception) -> None:
        log.error("discovery of %s failed", shown(run_dir), exc_info=exc)
        message = printable(f"discovery failed: {type(exc).__name__}: {exc}")[:_ERROR_MAX]
        try:
            with session_scope(self.engine) as session:
                run_id = queue.ensure_run(session, name=run_dir.name, path=str(run_dir))
                queue.set_run_discovery_error(session, run_id=run_id, error=message)
        except (OperationalError, DBAPIError) as failed:
            if _is_connection_error(failed):
                raise
            # Not even the error could be written: the log has it, the other runs go on.
            log.error("cannot record the discovery error of %s: %s", shown(run_dir), failed)

    def _discover_run(self, run_dir: Path) -> int:
        problems: list[str] = []
        try:
            refs = discover(run_dir, settle_s=self.settings.settle_s, confine=self.confine)
        except CheckpointError as exc:
            log.error("cannot list %s: %s", shown(run_dir), exc)
            refs, problems = [], [str(exc)]
        new = 0
        with session_scope(self.engine) as session:
            run_id = queue.ensure_run(session, name=run_dir.name, path=str(run_dir))
            known = queue.known_checkpoints(session, run_id=run_id)
            for ref in refs:
                if ref.error is not None and ref.step is None:
                    problems.append(ref.error)
                    continue
                step = ref.step if ref.step is not None else 0
                if ref.error is not None:
                    if queue.register_refused(session, run_id=run_id, step=step,
                                              path=shown(ref.path), fmt=ref.format,
                                              error=ref.error[:_ERROR_MAX]) is not None:
                        log.error("refused %s step %s: %s", run_dir.name, step, ref.error)
                    continue
                if not ref.complete:
                    continue
                found = known.get(step)
                if found is None:
                    created = queue.register_checkpoint(
                        session, run_id=run_id, step=step, path=str(ref.path),
                        fingerprint=ref.fingerprint, fmt=ref.format,
                    )
                    if created is not None:
                        new += 1
                        log.info("queued %s step %s", run_dir.name, ref.step)
                elif found.path == str(ref.path):
                    new += self._refresh(session, run_dir, step, found, ref.fingerprint)
            if self.reanalyze and run_id not in self._reanalyzed:
                queue.reanalyze(session, run_id=run_id)
                self._reanalyzed.add(run_id)
            summary = _problems(problems)
            queue.set_run_discovery_error(session, run_id=run_id, error=summary)
        return new

    def _refresh(self, session: Any, run_dir: Path, step: int, found: queue.KnownCheckpoint,
                 fingerprint: str) -> int:
        """Compare a registered checkpoint with its files; 1 when it was queued again."""
        if found.discovery_error is not None and found.status != "failed":
            # The problem discovery noted after the analysis is gone (the folder is back).
            queue.set_checkpoint_discovery_error(session, checkpoint_id=found.checkpoint_id,
                                                 error=None)
        if found.fingerprint == fingerprint:
            return 0
        if found.status == "pending" and found.job_status == "queued":
            queue.set_fingerprint(session, checkpoint_id=found.checkpoint_id,
                                  fingerprint=fingerprint)
            return 0
        if queue.requeue_rewritten(session, checkpoint_id=found.checkpoint_id,
                                   fingerprint=fingerprint):
            log.info("%s step %s changed on disk: queued again", run_dir.name, step)
            return 1
        return 0

    # -- one job ---------------------------------------------------------------------------
    def process_one(self) -> bool:
        """Claim one job and process it; returns False when the queue had nothing to give."""
        def claim() -> queue.ClaimedJob | None:
            with session_scope(self.engine) as session:
                queue.requeue_stale(session)
            with session_scope(self.engine) as session:
                return queue.claim(session, worker_id=self.worker_id, lease_s=self.settings.lease_s)

        job = self._retry("claim", claim)
        if job is None:
            return False
        log.info("analysing step %s of run %s (%s)", job.step, job.run_id, job.path)
        beat = _Heartbeat(self, job.job_id)
        beat.start()
        started = time.monotonic()
        try:
            layers, spectra = self.analyze_checkpoint(Path(job.path), job.run_id)
        except CheckpointVanished as exc:
            self._finish_failed(job, str(exc), vanished=True)
        except Exception as exc:  # one bad checkpoint must never stop the worker
            log.exception("step %s of run %s failed", job.step, job.run_id)
            self._finish_failed(job, f"{type(exc).__name__}: {exc}")
        else:
            elapsed = time.monotonic() - started
            if beat.lost:
                log.warning("dropping results of job %s: its lease was lost", job.job_id)
            else:
                def write() -> bool:
                    with session_scope(self.engine) as session:
                        return queue.complete(
                            session, job_id=job.job_id, worker_id=self.worker_id, layers=layers,
                            spectra=spectra, device=str(self.device), elapsed_s=elapsed,
                            thresholds=self.thresholds,
                        )

                done = self._retry("complete", write)
                log.info("step %s of run %s: %d layers in %.2fs%s", job.step, job.run_id,
                         len(layers), elapsed, "" if done else " (lease lost, not written)")
        finally:
            beat.stop_event.set()
            beat.join(timeout=5)
        return True

    def _finish_failed(self, job: queue.ClaimedJob, error: str, *, vanished: bool = False) -> None:
        error = printable(error)  # exception texts may quote file names that are not UTF-8
        def write() -> None:
            with session_scope(self.engine) as session:
                queue.fail(session, job_id=job.job_id, worker_id=self.worker_id, error=error,
                           vanished=vanished, max_attempts=self.settings.max_attempts)

        self._retry("fail", write)

    def analyze_checkpoint(
        self, path: Path, run_id: int | None = None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Read and analyse one checkpoint, tensor by tensor; returns layer and spectrum rows."""
        first = _first_key(self._first_checkpoint(run_id) if run_id is not None else None,
                           self.confine)
        layers: list[dict[str, Any]] = []
        spectra: list[dict[str, Any]] = []
        for matrix in iter_layers(path, confine=self.confine):
            result = analyze_matrix(
                matrix.weight, stored_dtype=matrix.stored_dtype, method=self.settings.fit_method,
                thresholds=self.thresholds, device=self.device,
            )
            row = result.metrics()
            row.update(
                name=matrix.name, kind=matrix.kind, block=matrix.block,
                dtype=str(matrix.stored_dtype).removeprefix("torch."),
                distance_from_init=_distance(first, matrix.name, matrix.weight, self.confine),
            )
            layers.append(row)
            spectra.append({
                "name": matrix.name, "method": result.method,
                "evals": _as_bytes(result.evals), "rand_evals": _as_bytes(result.rand_evals),
            })
            if self.progress:
                sys.stderr.write(f"\r  {path.name}: {len(layers)} layers, {matrix.name[-48:]}"
                                 f" alpha={result.alpha or float('nan'):.2f}\x1b[K")
                sys.stderr.flush()
        if self.progress:
            sys.stderr.write("\n")
        if not layers:
            raise ValueError(f"{path}: no weight matrices found")
        return layers, spectra

    def _first_checkpoint(self, run_id: int) -> Path | None:
        from alphawatch.service.db.models import Checkpoint

        with session_scope(self.engine) as session:
            first = session.scalars(
                select(Checkpoint.path).where(Checkpoint.run_id == run_id)
                .order_by(Checkpoint.step).limit(1)
            ).first()
        return Path(first) if first else None

    # -- loops -----------------------------------------------------------------------------
    def run_once(self) -> int:
        """Discover, then process jobs until none is left; returns how many were processed."""
        self._retry("discover", self.discover_once)
        processed = 0
        while self.process_one():
            processed += 1
        return processed

    def run_forever(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; the job in hand is finished before returning."""
        log.info("worker %s watching %s on %s", self.worker_id,
                 ", ".join(map(str, self.run_dirs)) or "registered runs", self.device)
        while not stop.is_set():
            try:
                self._retry("discover", self.discover_once, stop)
                self.passes += 1
                while not stop.is_set() and self.process_one():
                    pass
            except (OperationalError, DBAPIError):
                if stop.is_set():
                    break
                raise
            stop.wait(self.settings.poll_interval_s)
        log.info("worker %s stopped", self.worker_id)


def _is_connection_error(exc: DBAPIError) -> bool:
    return bool(exc.connection_invalidated) or isinstance(exc, OperationalError)


def _as_bytes(values: np.ndarray | None) -> bytes | None:
    if values is None:
        return None
    return np.ascontiguousarray(values, dtype=np.float32).tobytes()


def _first_key(first: Path | None, confine: Confinement) -> tuple[Path, str] | None:
    """The run's first checkpoint and its fingerprint, once per analysis; None when unusable.

    The fingerprint keys the cache of its matrices: a first checkpoint rewritten in place is
    read again rather than compared from memory.
    """
    if first is None or not first.exists() or not confine.allows(first):
        return None
    return first, fingerprint(first, confine)


def _distance(first: tuple[Path, str] | None, name: str, weight: torch.Tensor,
              confine: Confinement) -> float | None:
    """‖W_t − W_0‖_F / ‖W_0‖_F against the run's first checkpoint, read one tensor at a time."""
    if first is None:
        return None
    try:
        w0 = _first_weight(first, name, confine)
    except (CheckpointError, OSError):
        return None
    if w0 is None or w0.shape != weight.shape:
        return None
    norm0 = float(torch.linalg.norm(w0))
    if norm0 == 0.0:
        return None
    return float(torch.linalg.norm(weight - w0)) / norm0


def _first_weight(key: tuple[Path, str], name: str, confine: Confinement
                  ) -> torch.Tensor | None:
    first = key[0]
    cache = _FIRST_CACHE.get(key)
    if cache is None:
        if _size(first) > _DISTANCE_MAX_BYTES:
            return None
        # Only matrices are kept, as float32: bounded by the model's size for a small run, and
        # the cache holds one run's first checkpoint at a time.
        cache = {m.name: m.weight for m in iter_layers(first, confine=confine)}
        _FIRST_CACHE.clear()
        _FIRST_CACHE[key] = cache
    return cache.get(name)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def _problems(messages: list[str]) -> str | None:
    """The run's discovery problems as one bounded text; None when there are none."""
    if not messages:
        return None
    shown_ = messages[:_PROBLEMS_SHOWN]
    more = len(messages) - len(shown_)
    text = "\n".join(shown_) + (f"\n... and {more} more" if more else "")
    return text[:_ERROR_MAX]


# Errors are stored as text the API serves: bounded, so a folder of a million bad names costs
# a few kilobytes, not megabytes, per run.
_ERROR_MAX = 8000
_PROBLEMS_SHOWN = 20


# Distance from init keeps the first checkpoint's matrices in memory; past this size it would
# break the "a few times the largest matrix" memory promise, so it is not computed.
_DISTANCE_MAX_BYTES = 256 * 1024 * 1024
_FIRST_CACHE: dict[tuple[Path, str], dict[str, torch.Tensor]] = {}
