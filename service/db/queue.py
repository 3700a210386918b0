"""The analysis job queue: register, claim with a lease, heartbeat, complete, fail, recover.

PostgreSQL: a claim is one ``UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED) RETURNING``
committed at once, so any number of workers share the queue without blocking each other and the
analysis runs outside any transaction. SQLite has a single writer; the same functions run there
as plain transactions (one worker per database file).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from alphawatch.service.db.aggregates import stat_rows
from alphawatch.service.db.models import (
    LAYER_COLUMNS,
    AnalysisJob,
    Checkpoint,
    CheckpointStat,
    LayerMetric,
    Run,
    Spectrum,
)
from alphawatch.trust import Thresholds


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds a lease on."""

    job_id: int
    checkpoint_id: int
    run_id: int
    step: int
    path: str
    attempts: int


def _now() -> datetime:
    return datetime.now(UTC)


def _insert(session: Session, table: Any) -> Any:
    """``INSERT`` for the session's dialect, where ``on_conflict_do_nothing`` exists."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def ensure_run(session: Session, *, name: str, path: str) -> int:
    """Id of the run at ``path``, created if new (a name already taken gets a suffix).

    Two workers that find the same new run at once both end with the one row: the insert
    does nothing on a name conflict (waiting for the other transaction on PostgreSQL), and
    the run is then looked up again by path.
    """
    for n in range(1, 1000):
        found = session.scalars(select(Run.id).where(Run.path == path).order_by(Run.id)).first()
        if found is not None:
            return found
        unique = name if n == 1 else f"{name}-{n}"
        if session.scalars(select(Run.id).where(Run.name == unique)).first() is not None:
            continue
        created = session.scalar(
            _insert(session, Run).values(name=unique, path=path, created_at=_now())
            .on_conflict_do_nothing(index_elements=["name"]).returning(Run.id))
        if created is not None:
            return int(created)
    raise ValueError(f"no free run name for {name!r}")


def register_checkpoint(
    session: Session, *, run_id: int, step: int, path: str, fingerprint: str, fmt: str
) -> int | None:
    """Create the checkpoint and its queued job; None when (run, step) is already known.

    A conflict with a checkpoint another worker registered at the same moment does nothing,
    instead of failing the transaction.
    """
    checkpoint_id = session.scalar(
        _insert(session, Checkpoint).values(
            run_id=run_id, step=step, path=path, fingerprint=fingerprint, format=fmt,
            status="pending", discovered_at=_now(), analysis_count=0)
        .on_conflict_do_nothing(index_elements=["run_id", "step"]).returning(Checkpoint.id))
    if checkpoint_id is None:
        return None
    session.add(AnalysisJob(checkpoint_id=checkpoint_id, status="queued"))
    session.flush()
    return int(checkpoint_id)


def register_refused(
    session: Session, *, run_id: int, step: int, path: str, fmt: str, error: str
) -> int | None:
    """Record a checkpoint discovery refused: ``failed`` with the error, never queued.

    Returns its id when it is new; None when (run, step) is known, whose row then only gets the
    error as its ``discovery_error`` (results stored before stay).
    """
    checkpoint_id = session.scalar(
        _insert(session, Checkpoint).values(
            run_id=run_id, step=step, path=path, fingerprint="", format=fmt, status="failed",
            error=error, discovery_error=error, discovered_at=_now(), finished_at=_now(),
            analysis_count=0)
        .on_conflict_do_nothing(index_elements=["run_id", "step"]).returning(Checkpoint.id))
    if checkpoint_id is None:
        session.execute(update(Checkpoint).where(
            Checkpoint.run_id == run_id, Checkpoint.step == step,
            Checkpoint.discovery_error.is_distinct_from(error)).values(discovery_error=error))
        return None
    session.add(AnalysisJob(checkpoint_id=checkpoint_id, status="failed", last_error=error))
    session.flush()
    return int(checkpoint_id)


@dataclass(frozen=True)
class KnownCheckpoint:
    """What discovery compares a checkpoint found on disk with."""

    checkpoint_id: int
    path: str
    fingerprint: str
    status: str
    job_status: str | None
    discovery_error: str | None


def known_checkpoints(session: Session, *, run_id: int) -> dict[int, KnownCheckpoint]:
    """Every registered checkpoint of a run by step, in one query."""
    rows = session.execute(
        select(Checkpoint.step, Checkpoint.id, Checkpoint.path, Checkpoint.fingerprint,
               Checkpoint.status, AnalysisJob.status, Checkpoint.discovery_error)
        .outerjoin(AnalysisJob).where(Checkpoint.run_id == run_id)
    ).all()
    return {int(r[0]): KnownCheckpoint(int(r[1]), r[2], r[3], r[4], r[5], r[6]) for r in rows}


def requeue_rewritten(session: Session, *, checkpoint_id: int, fingerprint: str) -> bool:
    """Queue a finished checkpoint whose files changed in place; False when it is not finished.

    Its stored results stay until the new analysis replaces them in one transaction
    (:func:`complete`); meanwhile it is ``pending`` again, so trends leave it out rather than
    show numbers of files that no longer exist. A job queued or running is left alone (and
    the stored fingerprint with it): the next pass sees the change again once it ends.
    """
    job = session.scalars(select(AnalysisJob).where(
        AnalysisJob.checkpoint_id == checkpoint_id,
        AnalysisJob.status.in_(("done", "failed")))).first()
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        return False
    if job is None:
        if checkpoint.status in ("pending", "running"):
            return False
        job = AnalysisJob(checkpoint_id=checkpoint_id)
        session.add(job)
    job.status, job.attempts, job.worker_id, job.last_error = "queued", 0, None, None
    job.lease_expires_at = None
    checkpoint.status, checkpoint.fingerprint, checkpoint.rewritten_at = (
        "pending", fingerprint, _now())
    checkpoint.error = checkpoint.discovery_error = None
    return True


def set_fingerprint(session: Session, *, checkpoint_id: int, fingerprint: str) -> None:
    """A queued checkpoint's files changed before it was analysed: it will read the new ones."""
    session.execute(update(Checkpoint).where(Checkpoint.id == checkpoint_id)
                    .values(fingerprint=fingerprint))


def set_run_discovery_error(session: Session, *, run_id: int, error: str | None) -> None:
    """Record (or, with None, clear) why discovery could not list a run or refused entries."""
    session.execute(update(Run).where(Run.id == run_id,
                                      Run.discovery_error.is_distinct_from(error))
                    .values(discovery_error=error))


def set_checkpoint_discovery_error(session: Session, *, checkpoint_id: int,
                                   error: str | None) -> None:
    """Record (or, with None, clear) what discovery found wrong with a registered checkpoint."""
    session.execute(update(Checkpoint).where(
        Checkpoint.id == checkpoint_id, Checkpoint.discovery_error.is_distinct_from(error))
        .values(discovery_error=error))


_CLAIM_POSTGRES = text(
    """
    UPDATE analysis_job
       SET status = 'running', worker_id = :worker, attempts = attempts + 1,
           lease_expires_at = :lease, heartbeat_at = :now
     WHERE id = (
           -- the oldest queued job; SKIP LOCKED passes over rows another claimer is taking
           -- right now instead of waiting for its transaction, so claimers never block
           SELECT id FROM analysis_job
            WHERE status = 'queued'
            ORDER BY id
            LIMIT 1
              FOR UPDATE SKIP LOCKED)
    RETURNING id, checkpoint_id, attempts
    """
)


def claim(session: Session, *, worker_id: str, lease_s: float) -> ClaimedJob | None:
    """Take the oldest queued job with a lease of ``lease_s`` seconds; commits at once."""
    now = _now()
    lease = now + timedelta(seconds=lease_s)
    if session.get_bind().dialect.name == "postgresql":
        row = session.execute(
            _CLAIM_POSTGRES, {"worker": worker_id, "lease": lease, "now": now}
        ).first()
        if row is None:
            session.commit()
            return None
        job_id, checkpoint_id, attempts = int(row[0]), int(row[1]), int(row[2])
    else:
        job = session.scalars(
            select(AnalysisJob).where(AnalysisJob.status == "queued").order_by(AnalysisJob.id)
            .limit(1)
        ).first()
        if job is None:
            session.commit()
            return None
        job.status, job.worker_id = "running", worker_id
        job.attempts += 1
        job.lease_expires_at, job.heartbeat_at = lease, now
        job_id, checkpoint_id, attempts = job.id, job.checkpoint_id, job.attempts
    checkpoint = session.get(Checkpoint, checkpoint_id)
    assert checkpoint is not None  # the foreign key guarantees it
    checkpoint.status, checkpoint.started_at = "running", now
    # Commit now: the lease must be visible to other workers before the long analysis starts.
    session.commit()
    return ClaimedJob(job_id=job_id, checkpoint_id=checkpoint_id, run_id=checkpoint.run_id,
                      step=checkpoint.step, path=checkpoint.path, attempts=attempts)


def heartbeat(session: Session, *, job_id: int, worker_id: str, lease_s: float) -> bool:
    """Extend the lease; False when this worker no longer holds the job."""
    now = _now()
    result = session.execute(
        update(AnalysisJob)
        .where(AnalysisJob.id == job_id, AnalysisJob.worker_id == worker_id,
               AnalysisJob.status == "running")
        .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
    )
    return bool(getattr(result, "rowcount", 0))


def _held(session: Session, job_id: int, worker_id: str) -> AnalysisJob | None:
    query = select(AnalysisJob).where(
        AnalysisJob.id == job_id, AnalysisJob.worker_id == worker_id,
        AnalysisJob.status == "running",
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return session.scalars(query).first()


def complete(
    session: Session,
    *,
    job_id: int,
    worker_id: str,
    layers: list[dict[str, Any]],
    spectra: list[dict[str, Any]],
    device: str,
    elapsed_s: float,
    thresholds: Thresholds,
) -> bool:
    """Write every layer row, spectrum, robust statistic and the checkpoint summary at once.

    One transaction: a reader sees the checkpoint either not analysed or complete. Re-analysis
    replaces earlier rows of the same checkpoint and method. Returns False (and writes nothing)
    when the lease was lost to another worker.
    """
    job = _held(session, job_id, worker_id)
    if job is None:
        return False
    checkpoint_id = job.checkpoint_id
    methods = {str(layer.get("method", "ww")) for layer in layers}
    session.execute(delete(LayerMetric).where(LayerMetric.checkpoint_id == checkpoint_id,
                                              LayerMetric.method.in_(methods)))
    session.execute(delete(CheckpointStat).where(CheckpointStat.checkpoint_id == checkpoint_id,
                                                 CheckpointStat.method.in_(methods)))
    by_name = {(s["name"], s.get("method", "ww")): s for s in spectra}
    for layer in layers:
        values = {k: v for k, v in layer.items() if k in LAYER_COLUMNS}
        row = LayerMetric(checkpoint_id=checkpoint_id, **values)
        session.add(row)
        session.flush()
        spectrum = by_name.get((layer["name"], layer.get("method", "ww")))
        if spectrum is not None and spectrum.get("evals") is not None:
            session.add(Spectrum(layer_metric_id=row.id, evals=spectrum["evals"],
                                 rand_evals=spectrum.get("rand_evals")))
    summaries = stat_rows(layers, checkpoint_id=checkpoint_id, thresholds=thresholds)
    if summaries:
        session.execute(insert(CheckpointStat), summaries)
    checkpoint = session.get(Checkpoint, checkpoint_id)
    assert checkpoint is not None
    checkpoint.status, checkpoint.error = "done", None
    checkpoint.finished_at, checkpoint.analysis_s, checkpoint.device = _now(), elapsed_s, device
    checkpoint.n_layers = len(layers)
    checkpoint.analysis_count += 1
    checkpoint.n_trusted = sum(1 for layer in layers if layer.get("trusted"))
    job.status, job.lease_expires_at, job.last_error = "done", None, None
    return True


def fail(
    session: Session,
    *,
    job_id: int,
    worker_id: str,
    error: str,
    vanished: bool = False,
    max_attempts: int = 3,
) -> None:
    """Record a failed attempt: re-queue it, or end it failed (or vanished) with the error."""
    job = _held(session, job_id, worker_id)
    if job is None:
        return
    checkpoint = session.get(Checkpoint, job.checkpoint_id)
    assert checkpoint is not None
    job.last_error, checkpoint.error = error, error
    if vanished:
        job.status, checkpoint.status = "failed", "vanished"
    elif job.attempts >= max_attempts:
        job.status, checkpoint.status = "failed", "failed"
    else:
        job.status, checkpoint.status = "queued", "pending"
    job.worker_id, job.lease_expires_at = None, None
    checkpoint.finished_at = _now()


def requeue_stale(session: Session) -> int:
    """Put jobs whose lease ran out (a dead worker) back in the queue; returns how many."""
    now = _now()
    stale = session.scalars(
        select(AnalysisJob).where(AnalysisJob.status == "running",
                                  AnalysisJob.lease_expires_at < now)
    ).all()
    for job in stale:
        job.status, job.worker_id, job.lease_expires_at = "queued", None, None
        job.last_error = "lease expired: the worker stopped heartbeating"
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        if checkpoint is not None:
            checkpoint.status = "pending"
    return len(stale)


def reanalyze(session: Session, *, run_id: int, step: int | None = None) -> int:
    """Queue finished checkpoints of a run again; returns how many."""
    query = select(AnalysisJob).join(Checkpoint).where(
        Checkpoint.run_id == run_id, AnalysisJob.status.in_(("done", "failed"))
    )
    if step is not None:
        query = query.where(Checkpoint.step == step)
    jobs = session.scalars(query).all()
    for job in jobs:
        job.status, job.attempts, job.worker_id = "queued", 0, None
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        if checkpoint is not None:
            checkpoint.status = "pending"
    return len(jobs)


def queue_depth(session: Session) -> int:
    return int(session.scalar(
        select(func.count()).select_from(AnalysisJob).where(AnalysisJob.status == "queued")
    ) or 0)
