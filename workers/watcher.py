"""The watcher loop: discover checkpoints, claim them, analyse them, write the results.

Polling, not inotify: training clusters keep checkpoints on network filesystems where change
notifications do not arrive. Every step that touches the database is short and retried with
backoff when the database is unreachable; the analysis itself runs outside any transaction, in
a child process held to a time and memory budget (``workers.budget``), with a heartbeat thread
keeping the job's lease alive for at most that time.

A pass costs next to nothing when nothing changed: a run whose folders all kept their stamp
(inode, mtime) and whose checkpoints were all settled in the last pass is not listed, and in a
run that changed only new or unsettled entries are read. Files rewritten in place change no
folder's stamp: ``rewrite_checks_per_poll`` settled checkpoints are re-checked each pass,
round-robin, by a ``stat`` of the files and folders their fingerprint was computed from
(:class:`~alphawatch.workers.checkpoints.fingerprints.Shape`), or by their fingerprint where a
symlinked file makes that not enough (:mod:`~alphawatch.workers.checkpoints.memory`). A
worker's first pass over a registered run (after a restart) takes each checkpoint the database
holds as registered as settled while its fingerprint, a ``stat`` of its files (on object
storage: what the listing says), is the stored one: none of their files is read again. An
idle worker asks the queue whether it has anything (one read) before it claims, and bids for
the discovery lease with one statement. In :meth:`Watcher.run_forever` discovery runs in its
own thread and only the worker holding the discovery lease discovers (every worker analyses);
the holder also looks for "scan now" requests every second and scans those runs fully at once.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from alphawatch.locations import ObjectURL, location
from alphawatch.run_names import derived
from alphawatch.service.db import queue, registry, results, scans
from alphawatch.service.db.alerts import GateCheck
from alphawatch.service.db.models import CheckpointStatus, JobStatus
from alphawatch.service.db.rows import LayerRow, SpectrumRow
from alphawatch.service.db.session import is_connection_error, make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.workers.alerts import AlertDispatcher
from alphawatch.workers.analyst import AnalysedLayer, AnalysisOptions
from alphawatch.workers.budget import (
    AnalysisChild,
    AnalysisFailed,
    BudgetExceeded,
    Cancelled,
    ChildDied,
    budget_of,
)
from alphawatch.workers.checkpoints import CheckpointError, Confinement, survey
from alphawatch.workers.checkpoints.errors import printable, shown
from alphawatch.workers.checkpoints.memory import (
    DiscoveryMemory,
    RunMemory,
    Settled,
    registered,
)
from alphawatch.workers.checkpoints.objects import Mirrors, ObjectConfinement, run_url_check
from alphawatch.workers.loops import Backoff, LoopHealth

log = logging.getLogger("alphawatch.worker")
T = TypeVar("T")


class RunDirError(ValueError):
    """A run directory that does not exist or cannot be read."""


def check_run_dir(path: Path | ObjectURL) -> Path | ObjectURL:
    """Resolve ``path`` and fail with a clear message when it cannot be watched.

    An object-store URL is returned as it is (normalised): whether its prefix can be listed is
    found, and recorded on the run, by the first discovery pass.
    """
    if isinstance(path, ObjectURL):
        return path
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise RunDirError(f"run directory {resolved} does not exist")
    if not resolved.is_dir() and not resolved.is_file():
        raise RunDirError(f"{resolved} is neither a directory nor a checkpoint file")
    if not os.access(resolved, os.R_OK | (os.X_OK if resolved.is_dir() else 0)):
        raise RunDirError(f"run directory {resolved} cannot be read by this user")
    return resolved


def _place(text: str) -> Path | ObjectURL:
    """A checkpoint's place as the database holds it (a path, or a URL read by the child)."""
    try:
        return location(text)
    except ValueError:
        return Path(text)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Heartbeat(threading.Thread):
    """Renews a job's lease until stopped or past the job's time budget; records a lost lease.

    Past the budget the analysis has been stopped (or the worker is stuck): renewing further
    would keep a stuck job's lease alive for ever, so the lease is left to run out and another
    worker recovers the job, counting the attempt.
    """

    def __init__(self, watcher: Watcher, job_id: int, budget_s: float) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.watcher = watcher
        self.job_id = job_id
        self.deadline = time.monotonic() + budget_s
        self.stop_event = threading.Event()
        self.lost = False

    def run(self) -> None:
        try:
            self._beat()
        finally:
            self.watcher.health.forget("heartbeat")  # its streak ends with its job

    def _beat(self) -> None:
        settings = self.watcher.settings
        health = self.watcher.health
        while not self.stop_event.wait(settings.heartbeat_s):
            if time.monotonic() > self.deadline:
                log.warning(
                    "job %s is past its time budget: its lease is no longer renewed", self.job_id
                )
                return
            try:
                with session_scope(self.watcher.engine) as session:
                    alive = queue.heartbeat(
                        session,
                        job_id=self.job_id,
                        worker_id=self.watcher.worker_id,
                        lease_s=settings.lease_s,
                    )
            except Exception as exc:
                # A missed beat is not a lost lease: the lease outlives a few heartbeats.
                health.failed("heartbeat", exc, settings.heartbeat_s)
                continue
            health.ok("heartbeat")
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
        on_analysed: called with (run id, step) once a checkpoint's results are committed
            (continuous export); whatever it raises is logged, never the worker's concern.
    """

    def __init__(
        self,
        settings: Settings,
        run_dirs: Iterable[Path | ObjectURL] = (),
        *,
        worker_id: str | None = None,
        reanalyze: bool = False,
        on_analysed: Callable[[int, int], None] | None = None,
    ) -> None:
        self.settings = settings
        named = [check_run_dir(location(p)) for p in run_dirs]
        urls = [p for p in named if isinstance(p, ObjectURL)]
        # The folders named on the command line are allowed, besides ALPHAWATCH_ALLOWED_ROOTS:
        # naming a folder to watch is allowing it. Nothing else is, whatever a symlink says.
        # So are the URLs named, besides the URL prefixes among the allowed roots.
        local = Confinement.to(
            [*settings.allowed_roots, *(p for p in named if isinstance(p, Path))]
        )
        self.url_roots = (*settings.allowed_url_roots, *urls)
        # Runs in object storage are read through sparse local mirrors of their prefixes
        # (workers.checkpoints.objects); a worker without any keeps the plain confinement.
        self._objects = Mirrors(spool_max_bytes=int(settings.spool_max_mb * 1024 * 1024))
        self.confine: Confinement = (
            ObjectConfinement.around(local, self._objects, self.url_roots)
            if self.url_roots
            else local
        )
        # Every run is known by its local path; a URL's is its mirror's root.
        self.run_dirs = [self._objects.root(p) if isinstance(p, ObjectURL) else p for p in named]
        self._urls: dict[Path, ObjectURL] = {self._objects.root(u): u for u in urls}
        self._named = frozenset(self.run_dirs)
        self.worker_id = worker_id or default_worker_id()
        self.reanalyze = reanalyze
        self.on_analysed = on_analysed
        self.engine = make_engine(settings.database_url)
        self.thresholds = settings.trust
        self._reanalyzed: set[int] = set()
        self._memory = DiscoveryMemory(self.confine)
        # Registered run folders as Path objects, by the text the database holds.
        self._paths: dict[str, Path] = {}
        self._work = threading.Event()  # new jobs were queued: the analysis loop claims
        self._leased = False
        self._lease_renew_at = 0.0
        self._discovery_failed: BaseException | None = None
        self._leasing = False  # only run_forever discovers behind the lease
        self._stop = threading.Event()  # run_forever's: retries end when it is set
        # Set stop_grace_s after the stop (or at once, by abandon()): the analysis in hand is
        # stopped and its job given back to the queue.
        self._abandon = threading.Event()
        # Jobs processed (done or failed) by run_forever, for --max-jobs.
        self.processed = 0
        # A claim that met a lost connection may have been committed: the next claim is made
        # without asking first, and takes that job back (queue.reclaim).
        self._claim_unsure = False
        # Failures of the loops, for the log and /health; none of them ends a loop.
        self.health = LoopHealth()
        # Discovery passes completed; a supervisor reads it to see that the loop is live.
        self.passes = 0
        # A live line per layer on a terminal; plain log records when stderr is a file or pipe.
        self.progress = sys.stderr.isatty()
        self.budget = budget_of(settings)
        self.options = AnalysisOptions.from_settings(
            settings,
            confine=local,
            progress=self.progress,
            url_roots=self.url_roots,
            # In the mirrors' folder: kept across analyses (and analysis processes), removed
            # with it when the worker stops.
            base_copies=self._objects.base / "bases" if self.url_roots else None,
        )
        self.device = self.options.device
        self.child = AnalysisChild(self.options, self.budget)
        # The gate is evaluated after each analysed checkpoint; its alerts are delivered by a
        # thread of this worker, never by the loop that analyses.
        notify = settings.alerts.webhook_url is not None
        self.gate = GateCheck(
            defaults=settings.gate,
            method=settings.fit_method,
            thresholds=settings.trust,
            notify=notify,
        )
        self.alerts = (
            AlertDispatcher(settings.alerts, self.engine, self.worker_id) if notify else None
        )

    # -- database access with retry -------------------------------------------------------
    def _retry(
        self,
        what: str,
        fn: Callable[[], T],
        stop: threading.Event | None = None,
        *,
        grace_s: float = 0.0,
    ) -> T:
        """Run the unit of work ``fn`` again, whole, for as long as the connection fails.

        Every unit of work opens its own sessions, so each try starts on a fresh connection
        from the pool, and a try cut off at any statement left nothing half written. Once
        ``stop`` (by default :meth:`run_forever`'s) is set, the tries go on for ``grace_s``
        more seconds at most, then the connection error is raised: a worker told to stop
        while the database is away exits within seconds.
        """
        stop = stop or self._stop
        backoff = Backoff()
        give_up_at: float | None = None
        while True:
            try:
                return fn()
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                delay = backoff.next()
                log.warning(
                    "database unreachable during %s (%s: %s); retrying in %.1fs",
                    what,
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                    delay,
                )
                if not stop.is_set() and not stop.wait(delay):
                    continue
                now = time.monotonic()
                give_up_at = now + grace_s if give_up_at is None else give_up_at
                if now >= give_up_at:
                    raise
                time.sleep(min(delay, give_up_at - now, 0.5))

    # -- discovery ---------------------------------------------------------------------------
    def _watched_dirs(self) -> dict[Path, int | None]:
        """Every run folder to look at, with its run id when it is registered.

        Whether a registered run's folder is still there is left to :meth:`_present`, asked
        only of the runs that are not skipped as unchanged (whose stamp is one ``stat``).
        """
        with self.engine.connect() as conn:
            rows = registry.registered_runs(conn)
        paths = self._paths
        if len(paths) > 2 * len(rows) + 100:
            paths.clear()  # runs deleted: their folders are forgotten
        seen: dict[Path, int | None] = dict.fromkeys(self.run_dirs)
        for run_id, text_ in rows:
            path = paths.get(text_)
            if path is None:
                path = paths[text_] = self._local(text_)
            if seen.get(path) is None:
                seen[path] = run_id
        return seen

    def _local(self, text: str) -> Path:
        """The local path of a run or checkpoint as the database holds it: a URL's mirror
        root (registered runs are confined by the URL roots when their objects are read)."""
        try:
            place = location(text)
        except ValueError:
            return Path(text)  # refused when discovery looks at it, with the reason
        if isinstance(place, ObjectURL):
            root = self._objects.root(place)
            self._urls[root] = place
            return root
        return place

    def _text(self, path: Path) -> str:
        """A path's text as stored and shown: a mirror path's URL, else ``str(path)``."""
        return self._objects.text(path)

    def _sync(self, run_dir: Path) -> None:
        """List a URL run's objects into its mirror (one LIST per 1,000 objects); nothing for
        a local run.

        Raises:
            OutsideRootError: the URL lies outside the allowed URL prefixes (nothing is listed).
            ObjectStoreError: the store could not be listed.
        """
        url = self._urls.get(run_dir)
        if url is None:
            return
        run_url_check(url, self.url_roots)
        self._objects.mirror(url).sync()

    def _present(self, run_dir: Path) -> bool:
        """A registered run whose folder is gone is skipped; one that now leads outside the
        roots (or cannot be looked at) is kept, so discovery records why on the run."""
        if run_dir in self._named:
            return True
        try:
            return run_dir.exists() or run_dir.is_symlink()
        except (OSError, ValueError):
            return True

    def discover_once(
        self, *, runs: Collection[Path] | None = None, full: Collection[Path] = ()
    ) -> int:
        """Register every complete checkpoint found; returns how many were new.

        Args:
            runs: only these run folders (a "scan now"); every watched run by default, and then
                ``rewrite_checks_per_poll`` settled checkpoints are fingerprinted again.
            full: run folders to read whole, as if seen for the first time.

        Nothing found in a run directory ends the pass: a run that cannot be listed, and each
        entry discovery refuses, is recorded on the run or on the checkpoint (``discovery_error``)
        and the other runs and checkpoints go on. Only an unreachable database is raised, for
        the caller to retry.
        """
        watched = self._watched_dirs()
        self._memory.forget_gone(watched)
        self._objects.forget({u for p, u in self._urls.items() if p in watched})
        changed: set[Path] = set()
        if runs is None:
            changed = self._memory.recheck(self.settings.rewrite_checks_per_poll)
        else:
            watched = {p: i for p, i in watched.items() if p in runs}
        new = 0
        for run_dir, run_id in watched.items():
            try:
                self._sync(run_dir)
            except Exception as exc:  # a store that cannot be listed is that run's problem
                self._memory.forget(run_dir)
                if is_connection_error(exc):
                    raise
                self._record_run_error(run_dir, exc)
                continue
            memory = None if run_dir in full else self._memory.get(run_dir)
            if memory is not None and run_dir not in changed and memory.unchanged_since(run_id):
                continue
            if not self._present(run_dir):
                self._memory.forget(run_dir)
                continue
            try:
                if memory is not None:
                    settled = memory.settled
                else:
                    settled = {} if run_dir in full else self._registered(run_dir, run_id)
                new += self._discover_run(run_dir, memory, settled)
            except Exception as exc:  # one run, whatever its folder holds, never ends the worker
                self._memory.forget(run_dir)
                if is_connection_error(exc):
                    raise  # the pass is retried whole
                self._record_run_error(run_dir, exc)
            self._renew_lease()
        return new

    def _record_run_error(self, run_dir: Path, exc: Exception) -> None:
        text = self._text(run_dir)
        log.error("discovery of %s failed: %s", shown(text), self._objects.shown(str(exc)))
        message = printable(self._objects.shown(f"discovery failed: {type(exc).__name__}: {exc}"))[
            :_ERROR_MAX
        ]
        try:
            with session_scope(self.engine) as session:
                run_id = registry.ensure_run(session, name=derived(run_dir.name), path=text)
                registry.set_run_discovery_error(session, run_id=run_id, error=message)
        except Exception as failed:
            if is_connection_error(failed):
                raise
            # Not even the error could be written: the log has it, the other runs go on.
            log.error("cannot record the discovery error of %s: %s", shown(text), failed)

    def _registered(self, run_dir: Path, run_id: int | None) -> dict[Path, Settled]:
        """What a first pass over a registered run takes as settled: its checkpoints as the
        database holds them, each while its fingerprint is the stored one, so that a restarted
        worker reads none of their files again (one query; see
        :func:`~alphawatch.workers.checkpoints.memory.registered`).

        A checkpoint discovery found something wrong with (``discovery_error``), and one
        registered under another folder, are read again; a scan asked for reads every one.
        """
        if run_id is None:
            return {}
        with session_scope(self.engine) as session:
            known = registry.known_checkpoints(session, run_id=run_id)
        base = self._text(run_dir) + "/"
        settled: dict[Path, Settled] = {}
        for step, found in known.items():
            if found.fingerprint and found.discovery_error is None and found.path.startswith(base):
                path = run_dir / found.path[len(base) :]
                settled[path] = registered(
                    path, step=step, fmt=found.format, fingerprint=found.fingerprint
                )
        return settled

    def _discover_run(
        self, run_dir: Path, memory: RunMemory | None, settled: Mapping[Path, Settled]
    ) -> int:
        problems: list[str] = []
        try:
            found = survey(
                run_dir, settle_s=self.settings.settle_s, confine=self.confine, settled=settled
            )
            refs, listed, inodes, shapes = found.refs, found.listed, found.inodes, found.shapes
        except CheckpointError as exc:
            log.error(
                "cannot list %s: %s", shown(self._text(run_dir)), self._objects.shown(str(exc))
            )
            refs, problems, listed, inodes, shapes = [], [str(exc)], {}, {}, {}
        url = self._urls.get(run_dir)
        if url is not None:
            problems += self._objects.mirror(url).problems
        new = 0
        now_settled: dict[Path, Settled] = {}
        quiet = True
        with session_scope(self.engine) as session:
            run_id = registry.ensure_run(
                session, name=derived(run_dir.name), path=self._text(run_dir)
            )
            known = registry.known_checkpoints(session, run_id=run_id)
            for ref in refs:
                final = False
                problems += ref.notes  # passed over below a checkpoint that goes on without it
                if ref.error is not None and ref.step is None:
                    problems.append(ref.error)
                    continue
                step = ref.step if ref.step is not None else 0
                if ref.error is not None:
                    quiet = False  # read again each pass, as long as it is refused
                    if (
                        registry.register_refused(
                            session,
                            run_id=run_id,
                            step=step,
                            path=shown(self._text(ref.path)),
                            fmt=ref.format,
                            error=self._objects.shown(ref.error)[:_ERROR_MAX],
                        )
                        is not None
                    ):
                        log.error(
                            "refused %s step %s: %s",
                            run_dir.name,
                            step,
                            self._objects.shown(ref.error),
                        )
                    continue
                if not ref.complete:
                    quiet = False
                    continue
                found_ = known.get(step)
                if found_ is None:
                    created = registry.register_checkpoint(
                        session,
                        run_id=run_id,
                        step=step,
                        path=self._text(ref.path),
                        fingerprint=ref.fingerprint,
                        fmt=ref.format,
                    )
                    if created is not None:
                        new += 1
                        final = True
                        log.info("queued %s step %s", run_dir.name, ref.step)
                elif found_.path == self._text(ref.path):
                    queued, final = self._refresh(session, run_dir, step, found_, ref.fingerprint)
                    new += queued
                else:
                    final = True  # the step is registered under another path: left alone
                if not final:
                    quiet = False
                    continue
                now_settled[ref.path] = self._memory.settle(
                    run_dir,
                    ref,
                    earlier=settled,
                    inodes=inodes,
                    shapes=shapes,
                    rechecked=bool(self.settings.rewrite_checks_per_poll),
                )
            requeued = 0
            if self.reanalyze and run_id not in self._reanalyzed:
                requeued = queue.reanalyze(session, run_id=run_id)
                self._reanalyzed.add(run_id)
            keep_up = self.settings.keep_up
            if not keep_up and memory is None:
                # The policy is off (or was turned off): what it skipped is analysed after all.
                requeued += queue.resume_skipped(session, run_id=run_id)
            if new or requeued or (keep_up and memory is None):
                # Each step added moves the places of the run's backlog (newest, then coarse
                # to fine); once per pass, not per checkpoint.
                queue.reorder(session, run_id=run_id)
                if keep_up:
                    skipped = queue.keep_up(session, run_id=run_id, bound=keep_up)
                    if skipped:
                        log.info(
                            "keep-up: %s had more than %s checkpoints queued; skipped %s",
                            run_dir.name,
                            keep_up,
                            skipped,
                        )
            summary = _problems([self._objects.shown(p) for p in problems])
            registry.set_run_discovery_error(session, run_id=run_id, error=summary)
        self._memory.remember(
            run_dir, RunMemory(run_id, listed, now_settled, quiet and not problems)
        )
        return new

    def _refresh(
        self,
        session: Any,
        run_dir: Path,
        step: int,
        found: registry.KnownCheckpoint,
        fingerprint: str,
    ) -> tuple[int, bool]:
        """Compare a registered checkpoint with its files.

        Returns:
            1 when it was queued again (else 0), and whether the database now matches the
            files (False: a job holds it, the change is looked at again next pass).
        """
        if found.discovery_error is not None and found.status != CheckpointStatus.FAILED:
            # The problem discovery noted after the analysis is gone (the folder is back).
            registry.set_checkpoint_discovery_error(
                session, checkpoint_id=found.checkpoint_id, error=None
            )
        if found.fingerprint == fingerprint:
            return 0, True
        if (found.status, found.job_status) in _NOT_YET_READ:
            registry.set_fingerprint(
                session, checkpoint_id=found.checkpoint_id, fingerprint=fingerprint
            )
            return 0, True
        if registry.requeue_rewritten(
            session, checkpoint_id=found.checkpoint_id, fingerprint=fingerprint
        ):
            log.info("%s step %s changed on disk: queued again", run_dir.name, step)
            return 1, True
        return 0, False

    # -- the discovery lease and "scan now" ---------------------------------------------------
    def _renew_lease(self) -> bool:
        """Take or keep the discovery lease; writes only when half of it has run out."""
        if self._leased and time.monotonic() < self._lease_renew_at:
            return True
        if not self._leasing:
            return True
        ttl = self.settings.lease_s
        with self.engine.begin() as conn:
            held = scans.hold_lease(conn, holder=self.worker_id, ttl_s=ttl)
        if held and not self._leased:
            log.info("worker %s discovers now", self.worker_id)
        self._leased = held
        self._lease_renew_at = time.monotonic() + ttl / 2
        return held

    def _release_lease(self) -> None:
        """Give the discovery lease back, waiting a few seconds at most: a stopping worker
        never hangs on an unreachable database (the lease then runs out by itself)."""
        if not self._leased:
            return
        self._leased = False

        def release() -> None:
            try:
                with session_scope(self.engine) as session:
                    scans.release_lease(session, holder=self.worker_id)
            except Exception as exc:
                log.warning("could not give the discovery lease back (it runs out): %s", exc)

        releasing = threading.Thread(target=release, name="lease-release", daemon=True)
        releasing.start()
        releasing.join(_RELEASE_WAIT_S)

    def _tick(self, due: bool, stop: threading.Event) -> None:
        """One discovery tick: a whole pass when due, else only the runs asked to be scanned."""
        if not self._retry("discovery lease", self._renew_lease, stop):
            return

        def pending() -> list[scans.ScanRequest]:
            with self.engine.connect() as conn:
                return scans.scan_requests(conn)

        requests = self._retry("scan requests", pending, stop)
        if not due and not requests:
            return
        asked = {self._local(r.path) for r in requests}
        if asked:
            log.info("scan asked for: %s", ", ".join(sorted(map(self._text, asked))))
        new = self._retry(
            "discover", lambda: self.discover_once(runs=None if due else asked, full=asked), stop
        )

        def clear() -> None:
            with session_scope(self.engine) as session:
                for request in requests:
                    scans.clear_scan_request(session, request=request)

        if requests:
            self._retry("scan requests", clear, stop)
        if new:
            self._work.set()

    def _discover_forever(self, stop: threading.Event, ended: threading.Event) -> None:
        """The discovery thread: a pass every poll interval, scan requests every second.

        Whatever a tick raises (the database refusing a statement, a bug, a fault no run
        accounts for) is recorded and the tick tried again after a growing pause; only
        ``stop`` ends the thread.
        """
        next_pass = time.monotonic()
        backoff = Backoff()
        try:
            while not (stop.is_set() or ended.is_set()):
                due = time.monotonic() >= next_pass
                if due:
                    next_pass = time.monotonic() + self.settings.poll_interval_s
                try:
                    if due or self._leased:
                        self._tick(due, stop)
                except Exception as exc:
                    if stop.is_set():
                        break
                    pause = backoff.next()
                    self.health.failed("discovery", exc, pause)
                    next_pass = time.monotonic()  # the pass is made again after the pause
                    _pause(pause, stop, ended)
                    continue
                backoff.reset()
                self.health.ok("discovery")
                if due:
                    self.passes += 1
                ended.wait(min(_TICK_S, max(0.0, next_pass - time.monotonic())))
        except BaseException as exc:  # not an Exception: nothing to go on with
            self._discovery_failed = exc
            self._work.set()

    # -- one job ---------------------------------------------------------------------------
    def process_one(self, *, ask_first: bool = False) -> bool:
        """Claim one job and process it; returns False when the queue had nothing to give.

        Args:
            ask_first: look whether the queue has anything to give (one query that writes
                nothing, :func:`queue.has_work`) before recovering stale jobs and claiming.
        """
        try:
            # Started (once, or after a death) before claiming: importing torch is no part of any
            # checkpoint's budget, and a worker always has an analysis process ready.
            self.child.start()
        except RuntimeError as exc:
            log.error("%s; trying again at the next poll", exc)
            return False

        def claim() -> queue.ClaimedJob | None:
            if ask_first and not self._claim_unsure:
                with self.engine.connect() as conn:
                    if not queue.has_work(conn):
                        return None
            with session_scope(self.engine) as session:
                queue.requeue_stale(session, max_attempts=self.settings.max_attempts)
            unsure, self._claim_unsure = self._claim_unsure, True
            lease_s = self.settings.lease_s
            with session_scope(self.engine) as session:
                claimed = (
                    queue.reclaim(session, worker_id=self.worker_id, lease_s=lease_s)
                    if unsure
                    else None
                ) or queue.claim(session, worker_id=self.worker_id, lease_s=lease_s)
            self._claim_unsure = False
            return claimed

        job = self._retry("claim", claim)
        if job is None:
            return False
        try:
            self._process(job)
        except Exception as exc:
            if is_connection_error(exc):
                raise  # told to stop while the database is away: the lease runs out
            # A fault of the worker, not of the checkpoint: the attempt fails, with the reason,
            # rather than the job staying held by a worker that goes on without it.
            log.exception("step %s of run %s could not be processed", job.step, job.run_id)
            self._finish_failed(job, f"the worker failed: {type(exc).__name__}: {exc}")
        return True

    def _process(self, job: queue.ClaimedJob) -> None:
        """Analyse a claimed job and write its results (or its failure)."""
        log.info("analysing step %s of run %s (%s)", job.step, job.run_id, job.path)
        first = self._retry("first checkpoint", lambda: self._first_checkpoint(job.run_id))
        prev: tuple[int, Path | ObjectURL] | None = None
        newest = True
        if {"prev", "distances"} & set(self.settings.deltas):
            prev, newest = self._retry(
                "previous checkpoint", lambda: self._previous_checkpoint(job)
            )
        # The heartbeat outlives the budget by one beat: the stopped job's failure is written
        # while the lease still holds.
        beat = _Heartbeat(self, job.job_id, self.budget.timeout_s + self.settings.heartbeat_s)
        beat.start()
        try:
            outcome = self.child.analyze(
                _place(job.path),
                first,
                None if prev is None else prev[1],
                newest=newest,
                cancel=self._abandon.is_set,
            )
        except Cancelled:
            self._release(job)
        except (BudgetExceeded, ChildDied) as exc:
            log.error("step %s of run %s failed: %s", job.step, job.run_id, exc)
            # The same input breaks the same budget again: no further attempt is made.
            self._finish_failed(job, str(exc), final=isinstance(exc, BudgetExceeded))
        except AnalysisFailed as exc:
            log.error("step %s of run %s failed: %s", job.step, job.run_id, exc)
            self._finish_failed(job, str(exc), vanished=exc.vanished)
        else:
            if beat.lost:
                log.warning("dropping results of job %s: its lease was lost", job.job_id)
            else:
                if outcome.analysis.base_error is not None:
                    log.warning(
                        "step %s of run %s: compared with no base: %s",
                        job.step,
                        job.run_id,
                        printable(outcome.analysis.base_error),
                    )
                layers, spectra = stored_rows(
                    outcome.analysis.layers, ref_step=None if prev is None else prev[0]
                )

                def write() -> bool:
                    with session_scope(self.engine) as session:
                        return results.complete(
                            session,
                            job_id=job.job_id,
                            worker_id=self.worker_id,
                            layers=layers,
                            spectra=spectra,
                            device=outcome.device,
                            elapsed_s=outcome.elapsed_s,
                            thresholds=self.thresholds,
                            gate=self.gate,
                        )

                done = self._retry("complete", write, grace_s=_STOP_GRACE_S)
                if done and self.alerts is not None:
                    self.alerts.wake()
                log.info(
                    "step %s of run %s: %d layers in %.2fs, peak %.0f MB%s",
                    job.step,
                    job.run_id,
                    len(layers),
                    outcome.elapsed_s,
                    outcome.peak_mb,
                    "" if done else " (lease lost, not written)",
                )
                if done and self.on_analysed is not None:
                    self._announce(job)
        finally:
            beat.stop_event.set()
            beat.join(timeout=5)

    def _announce(self, job: queue.ClaimedJob) -> None:
        assert self.on_analysed is not None
        try:
            self.on_analysed(job.run_id, job.step)
        except Exception as exc:  # an exporter's failure never fails the job or the worker
            log.warning(
                "after step %s of run %s: %s: %s", job.step, job.run_id, type(exc).__name__, exc
            )

    def _finish_failed(
        self, job: queue.ClaimedJob, error: str, *, vanished: bool = False, final: bool = False
    ) -> None:
        error = printable(error)  # exception texts may quote file names that are not UTF-8

        def write() -> None:
            with session_scope(self.engine) as session:
                queue.fail(
                    session,
                    job_id=job.job_id,
                    worker_id=self.worker_id,
                    error=error,
                    vanished=vanished,
                    max_attempts=job.attempts if final else self.settings.max_attempts,
                )

        self._retry("fail", write, grace_s=_STOP_GRACE_S)

    def _release(self, job: queue.ClaimedJob) -> None:
        """Give the job back to the queue, its attempt not counted (the worker is stopping)."""

        def write() -> bool:
            with session_scope(self.engine) as session:
                return queue.release(session, job_id=job.job_id, worker_id=self.worker_id)

        released = self._retry("release", write, grace_s=_STOP_GRACE_S)
        log.warning(
            "stopping: step %s of run %s %s",
            job.step,
            job.run_id,
            "given back to the queue" if released else "was no longer held by this worker",
        )

    def abandon(self) -> None:
        """Stop the analysis in hand now and give its job back (a second stop signal)."""
        self._abandon.set()

    def close(self) -> None:
        """Stop the analysis process; the next job starts a new one."""
        self.child.close()

    def _first_checkpoint(self, run_id: int) -> Path | ObjectURL | None:
        with session_scope(self.engine) as session:
            first = registry.first_checkpoint(session, run_id=run_id)
        return _place(first) if first else None

    def _previous_checkpoint(
        self, job: queue.ClaimedJob
    ) -> tuple[tuple[int, Path | ObjectURL] | None, bool]:
        """The checkpoint before the job's by step whose files exist (rotation deletes some),
        whether or not it was analysed yet: claims go newest first. In object storage the
        nearest registered one is taken without a request; if its objects are gone, the
        analysis records that it compared with no base. Then whether the job's checkpoint is
        the run's newest (the next one's base)."""
        with session_scope(self.engine) as session:
            earlier = registry.earlier_checkpoints(session, run_id=job.run_id, step=job.step)
            newest = registry.is_newest(session, run_id=job.run_id, step=job.step)
        for step, path in earlier:
            place = _place(path)
            if isinstance(place, ObjectURL) or place.exists():
                return (step, place), newest
        return None, newest

    # -- loops -----------------------------------------------------------------------------
    def run_once(self) -> int:
        """Discover, then process jobs until none is left; returns how many were processed."""
        self._retry("discover", self.discover_once)
        processed = 0
        while self.process_one():
            processed += 1
        if self.alerts is not None:
            # One pass, no waiting for retries: what is left stays queued for the next worker.
            self.alerts.deliver_due()
        return processed

    def run_forever(
        self,
        stop: threading.Event,
        *,
        max_jobs: int | None = None,
        exit_when_idle_s: float | None = None,
        analyse: bool = True,
    ) -> None:
        """Poll until ``stop`` is set, or until a limit below is reached.

        Discovery runs in a thread of its own, behind the discovery lease; this loop claims and
        analyses jobs, at once when that thread queued some, else every poll interval. Once
        ``stop`` is set the job in hand is finished if it can be within ``stop_grace_s``;
        past that (or at once after :meth:`abandon`) its analysis is stopped and the job given
        back to the queue (:func:`queue.release`), never left for its lease to run out.

        Args:
            stop: ends the loop (a signal handler sets it).
            max_jobs: return after processing this many jobs (done or failed).
            exit_when_idle_s: return once the queue has had nothing claimable (the count of
                :data:`queue.QUEUE_DEPTH_SQL` is 0) for this many seconds.
            analyse: False: discovery only, for the one small process that keeps the queue
                filled while a scaler has stopped every GPU worker.
        """
        log.info(
            "worker %s %s %s on %s",
            self.worker_id,
            "watching" if analyse else "discovering (no analysis) in",
            ", ".join(map(str, self.run_dirs)) or "registered runs",
            self.device if analyse else "no device",
        )
        ended = threading.Event()
        self._discovery_failed = None
        self._stop = stop
        self._abandon.clear()
        self._leasing = True
        finder = threading.Thread(
            target=self._discover_forever, args=(stop, ended), name="discovery", daemon=True
        )
        finder.start()
        grace = threading.Thread(
            target=self._grace, args=(stop, ended), name="stop-grace", daemon=True
        )
        grace.start()
        if self.alerts is not None:
            self.alerts.start()
        backoff = Backoff()
        idle_since: float | None = None
        try:
            while not stop.is_set():
                if self._discovery_failed is not None:
                    raise self._discovery_failed
                if not analyse:
                    stop.wait(_TICK_S)
                    continue
                if max_jobs is not None and self.processed >= max_jobs:
                    log.info("worker %s processed %d jobs: exiting", self.worker_id, max_jobs)
                    break
                try:
                    # An idle worker asks before it claims: one read per poll, not two writes.
                    busy = self.process_one(ask_first=True)
                except Exception as exc:
                    if stop.is_set():
                        log.warning("stopping with: %s: %s", type(exc).__name__, exc)
                        break
                    # Whatever a claim or a write raised, the worker outlives it.
                    pause = backoff.next()
                    self.health.failed("analysis", exc, pause)
                    _pause(pause, stop)
                    continue
                backoff.reset()
                self.health.ok("analysis")
                if busy:
                    self.processed += 1
                    idle_since = None
                    continue
                now = time.monotonic()
                idle_since = now if idle_since is None else idle_since
                if exit_when_idle_s is not None and now - idle_since >= exit_when_idle_s:
                    log.info(
                        "worker %s: nothing to claim for %.0fs: exiting",
                        self.worker_id,
                        now - idle_since,
                    )
                    break
                self._idle(stop)
        finally:
            ended.set()
            finder.join(timeout=60)
            self._leasing = False
            self._release_lease()
            if self.alerts is not None:
                self.alerts.stop()
            self.close()
        log.info("worker %s stopped", self.worker_id)

    def _grace(self, stop: threading.Event, ended: threading.Event) -> None:
        """``stop_grace_s`` after ``stop`` is set, abandon the analysis still in hand."""
        while not (stop.is_set() or ended.is_set()):
            ended.wait(_TICK_S)
        if ended.is_set():
            return
        if not ended.wait(self.settings.stop_grace_s):
            self._abandon.set()

    def _idle(self, stop: threading.Event) -> None:
        """Wait a poll interval, or less: until discovery queues work or ``stop`` is set."""
        until = time.monotonic() + self.settings.poll_interval_s
        while not stop.is_set() and self._discovery_failed is None:
            left = until - time.monotonic()
            if left <= 0 or self._work.wait(min(left, _TICK_S)):
                break
        self._work.clear()


# A checkpoint whose files changed before they were read (queued, or skipped by the keep-up
# policy) reads the new ones whenever it is analysed: only its fingerprint is updated.
_NOT_YET_READ = frozenset(
    {
        (CheckpointStatus.PENDING, JobStatus.QUEUED),
        (CheckpointStatus.SKIPPED, JobStatus.SKIPPED),
    }
)


def _pause(seconds: float, *events: threading.Event) -> None:
    """Wait ``seconds``, or less: until one of ``events`` is set."""
    until = time.monotonic() + seconds
    while not any(e.is_set() for e in events):
        left = until - time.monotonic()
        if left <= 0:
            return
        events[0].wait(min(left, _TICK_S))


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
# How often the discovering worker looks for "scan now" requests, and the longest wait of the
# loops between looking at their stop event.
_TICK_S = 1.0
# Told to stop, how long a worker still tries to write the result (or failure) in hand through a
# lost connection, and how long it waits to give the discovery lease back: a stop while the
# database is away takes seconds, not the length of the outage.
_STOP_GRACE_S = 3.0
_RELEASE_WAIT_S = 3.0


def stored_rows(
    layers: Iterable[AnalysedLayer], *, ref_step: int | None = None
) -> tuple[list[LayerRow], list[SpectrumRow]]:
    """The ``layer_metric`` and ``spectrum`` rows of analysed layers, as ``results.complete``
    stores them; a field of the engine's result that has no column raises ``UnknownColumns``.

    ``ref_step`` is the step the layers' distances were measured against (the checkpoint
    before), stored as ``change_ref_step`` on each row that has distances.
    """
    rows: list[LayerRow] = []
    spectra: list[SpectrumRow] = []
    for layer in layers:
        moved = layer.distance
        rows.append(
            LayerRow.from_mapping(
                {
                    **layer.result.metrics(),
                    "name": layer.name,
                    "kind": layer.kind,
                    "block": layer.block,
                    "dtype": layer.dtype,
                    "distance_from_init": layer.distance_from_init,
                    "change_fro": None if moved is None else moved.change_fro,
                    "change_spectral": None if moved is None else moved.change_spectral,
                    "subspace_overlap": None if moved is None else moved.subspace_overlap,
                    "overlap_k": None if moved is None else moved.overlap_k,
                    "change_ref_step": None if moved is None else ref_step,
                }
            )
        )
        if layer.evals is not None:
            spectra.append(
                SpectrumRow(
                    name=layer.name,
                    method=layer.result.method,
                    evals=layer.evals,
                    rand_evals=layer.rand_evals,
                )
            )
    return rows, spectra
