"""Continuous export: the worker hands each analysed checkpoint to the trackers, off its loop.

The watcher calls the exporter (``on_analysed(run_id, step)``) after a checkpoint's results are
committed; the export runs on a thread of its own, so a slow or failing tracker never delays,
fails or stops the analysis. Each export logs whatever the tracker lacks of the run, so a
checkpoint missed while a tracker was down is logged at the next one. Nothing a tracker raises
ends that thread (``SystemExit`` from a library included), and should it end all the same, the
next checkpoint handed over starts a new one.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

from alphawatch.integrations.export.points import export_run
from alphawatch.integrations.export.trackers import (
    Target,
    TrackerMissing,
    TrackerRun,
    targets_of,
)
from alphawatch.service.db.models import Run
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings

log = logging.getLogger("alphawatch.export")


@dataclass
class _Open:
    tracker: TrackerRun
    known: dict[str, set[int]] = field(default_factory=dict)


class ContinuousExport:
    """The worker's exporter: call it with (run id, step) after each analysed checkpoint.

    Args:
        settings: the database and trust thresholds, and ``export`` (layers or not).
        targets: the trackers; those of ``settings.export`` when None.
    """

    def __init__(self, settings: Settings, targets: list[Target] | None = None) -> None:
        self.settings = settings
        self.targets = targets_of(settings.export) if targets is None else targets
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._open: dict[tuple[int, int], _Open] = {}
        self._thread = threading.Thread(target=self._loop, name="alphawatch-export", daemon=True)
        self.exported = 0  # values logged so far, over every target
        self.failures = 0
        self._handed = 0  # checkpoints handed over and not yet exported
        self._missing: set[int] = set()  # targets whose library is not installed
        self._done = threading.Condition()

    def __call__(self, run_id: int, step: int) -> None:
        with self._done:
            if not self._thread.is_alive():
                if self._thread.ident is not None:  # it ended: a thread starts only once
                    log.error("the export thread had ended; starting a new one")
                    self._thread = threading.Thread(
                        target=self._loop, name="alphawatch-export", daemon=True
                    )
                self._thread.start()
            self._handed += 1
        self._queue.put(run_id)

    def wait_idle(self, timeout: float) -> bool:
        """True once every handed checkpoint is exported (for tests and a clean stop)."""
        with self._done:
            return self._done.wait_for(lambda: self._handed == 0, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Finish what was handed over, then close every tracker run."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        for opened in self._open.values():
            try:
                opened.tracker.close()
            except Exception as exc:  # a tracker's failure never outlives the worker
                log.warning("closing an export run failed: %s: %s", type(exc).__name__, exc)
        self._open.clear()
        for target in self.targets:
            try:
                target.shutdown()
            except Exception as exc:
                log.warning("%s did not shut down cleanly: %s", target.kind, exc)

    def _loop(self) -> None:
        while True:
            run_id = self._queue.get()
            if run_id is None:
                return
            pending, stop = [run_id], False
            # Checkpoints of a run handed over meanwhile are exported by one pass.
            while not self._queue.empty():
                more = self._queue.get()
                if more is None:
                    stop = True
                    break
                pending.append(more)
            try:
                self._export_all(set(pending))
            except Exception:  # a bug of ours: these checkpoints are logged with the next ones
                self.failures += 1
                log.exception("export of runs %s failed", sorted(set(pending)))
            finally:
                with self._done:
                    self._handed -= len(pending)
                    self._done.notify_all()
            if stop:
                return

    def _export_all(self, run_ids: set[int]) -> None:
        for run_id in sorted(run_ids):
            for index, target in enumerate(self.targets):
                if index in self._missing:
                    continue
                try:
                    self._export(index, target, run_id)
                except TrackerMissing as exc:
                    # Not installed: no later checkpoint will do better than this one.
                    self._missing.add(index)
                    self.failures += 1
                    log.error("export to %s is off: %s", target.kind, exc)
                # Whatever a tracker raises, the worker goes on: a library's sys.exit() too,
                # which would end this thread and every later export with it.
                except (Exception, SystemExit) as exc:
                    self.failures += 1
                    log.warning(
                        "export of run %s to %s failed: %s: %s",
                        run_id,
                        target.kind,
                        type(exc).__name__,
                        exc,
                    )
                    stale = self._open.pop((index, run_id), None)
                    if stale is not None:
                        try:
                            stale.tracker.close()
                        except Exception:  # already broken; it is dropped either way
                            log.debug("closing a failed export run failed", exc_info=True)

    def _export(self, index: int, target: Target, run_id: int) -> None:
        engine = make_engine(self.settings.database_url)
        with session_scope(engine) as session:
            run = session.get(Run, run_id)
            if run is None:
                return
            opened = self._open.get((index, run_id))
            if opened is None:
                opened = self._open[(index, run_id)] = _Open(target.open(run.name))
            count = export_run(
                session=session,
                run_id=run_id,
                tracker=opened.tracker,
                thresholds=self.settings.trust,
                method=self.settings.fit_method,
                layers=self.settings.export.layers,
                known=opened.known,
            )
        self.exported += count
        log.info("exported %d values of run %s to %s", count, run.name, target.kind)
