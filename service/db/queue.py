"""The analysis job queue: register, claim with a lease, heartbeat, complete, fail, recover.

PostgreSQL: a claim is one ``UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED) RETURNING``
committed at once, so any number of workers share the queue without blocking each other and the
analysis runs outside any transaction. SQLite has a single writer; the same functions run there
as plain transactions (one worker per database file).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

from sqlalchemy import Connection, bindparam, delete, func, insert, select, text, update
from sqlalchemy.orm import Session

from alphawatch.service.db.aggregates import stat_rows, weight_rows
from alphawatch.service.db.alerts import GateCheck, record_verdict
from alphawatch.service.db.models import (
    AnalysisJob,
    Checkpoint,
    CheckpointStat,
    CheckpointStatus,
    JobStatus,
    LayerMetric,
    Run,
    Spectrum,
)
from alphawatch.service.db.rows import LayerRow, SpectrumRow
from alphawatch.service.db.session import dialect_insert, is_connection_error, utcnow
from alphawatch.trust import Thresholds

log = logging.getLogger("alphawatch.queue")


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds a lease on."""

    job_id: int
    checkpoint_id: int
    run_id: int
    step: int
    path: str
    attempts: int


class Event(Enum):
    """What happens to a job; each moves the job and its checkpoint together."""

    CLAIM = "claim"  # a worker takes a queued job
    COMPLETE = "complete"  # its results were written
    RETRY = "retry"  # an attempt failed or its worker died, and attempts are left
    GIVE_UP = "give_up"  # an attempt failed or its worker died, and none are left
    VANISH = "vanish"  # the checkpoint was deleted before or while it was read
    REQUEUE = "requeue"  # a finished checkpoint is to be analysed again


@dataclass(frozen=True)
class Transition:
    """From which job statuses an event may happen, and the pair of statuses it leads to."""

    sources: frozenset[JobStatus]
    job: JobStatus
    checkpoint: CheckpointStatus


_RUNNING = frozenset({JobStatus.RUNNING})

# The one state machine of jobs and checkpoints: nothing else assigns either status.
TRANSITIONS: dict[Event, Transition] = {
    Event.CLAIM: Transition(frozenset({JobStatus.QUEUED}), JobStatus.RUNNING,
                            CheckpointStatus.RUNNING),
    Event.COMPLETE: Transition(_RUNNING, JobStatus.DONE, CheckpointStatus.DONE),
    Event.RETRY: Transition(_RUNNING, JobStatus.QUEUED, CheckpointStatus.PENDING),
    Event.GIVE_UP: Transition(_RUNNING, JobStatus.FAILED, CheckpointStatus.FAILED),
    Event.VANISH: Transition(_RUNNING, JobStatus.FAILED, CheckpointStatus.VANISHED),
    Event.REQUEUE: Transition(frozenset({JobStatus.DONE, JobStatus.FAILED}), JobStatus.QUEUED,
                              CheckpointStatus.PENDING),
}


class IllegalTransition(RuntimeError):
    """An event that the state machine does not allow from the job's current status."""


def move(job: AnalysisJob, checkpoint: Checkpoint | None, event: Event) -> None:
    """Apply ``event`` to a job and its checkpoint together, or raise IllegalTransition."""
    transition = TRANSITIONS[event]
    if job.status not in transition.sources:
        raise IllegalTransition(f"job {job.id}: cannot {event.value} a {job.status} job")
    job.status = transition.job.value
    if checkpoint is not None:
        checkpoint.status = transition.checkpoint.value




def ensure_run(session: Session, *, name: str, path: str) -> int:
    """Id of the run at ``path``, created if new, under a name nothing can keep it from.

    The name is ``name`` if free, else the first free of ``name-2`` … ``name-99``, else ``name``
    with a short hash of the path, else ``name`` with a random suffix: whoever holds a write
    token can take names through the API, and no set of taken names may stop a run from being
    created (discovery creates every run it finds, and would stop with it).

    Two workers that find the same new run at once both end with the one row: the insert
    does nothing on a name conflict (waiting for the other transaction on PostgreSQL), and
    the run is then looked up again by path.
    """
    for unique in _run_names(name, path):
        found = session.scalars(select(Run.id).where(Run.path == path).order_by(Run.id)).first()
        if found is not None:
            return found
        if session.scalars(select(Run.id).where(Run.name == unique)).first() is not None:
            continue
        created = session.scalar(
            dialect_insert(session, Run).values(name=unique, path=path, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["name"]).returning(Run.id))
        if created is not None:
            return int(created)
    raise AssertionError("unreachable: _run_names never ends")


def _run_names(name: str, path: str) -> Iterator[str]:
    """The names a new run may take, in order of preference; endless, the last ones random.

    The numbered forms keep names readable where a few runs share a folder name; the hashed
    one is the same for the same path on every worker; the random ones (2**48 of them) cannot
    all be taken ahead of time, the others can.
    """
    def within(stem: str, suffix: str) -> str:
        return stem[:_RUN_NAME_MAX - len(suffix)] + suffix

    yield within(name, "")
    for n in range(2, 100):
        yield within(name, f"-{n}")
    yield within(name, "-" + hashlib.sha256(path.encode("utf-8", "surrogatepass"))
                 .hexdigest()[:8])
    while True:
        yield within(name, f"-{secrets.token_hex(6)}")


_RUN_NAME_MAX = 255  # run.name is String(255)


def register_checkpoint(
    session: Session, *, run_id: int, step: int, path: str, fingerprint: str, fmt: str
) -> int | None:
    """Create the checkpoint and its queued job; None when (run, step) is already known.

    A conflict with a checkpoint another worker registered at the same moment does nothing,
    instead of failing the transaction.
    """
    checkpoint_id = session.scalar(
        dialect_insert(session, Checkpoint).values(
            run_id=run_id, step=step, path=path, fingerprint=fingerprint, format=fmt,
            status=CheckpointStatus.PENDING.value, discovered_at=utcnow(), analysis_count=0)
        .on_conflict_do_nothing(index_elements=["run_id", "step"]).returning(Checkpoint.id))
    if checkpoint_id is None:
        return None
    session.add(AnalysisJob(checkpoint_id=checkpoint_id, status=JobStatus.QUEUED.value))
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
        dialect_insert(session, Checkpoint).values(
            run_id=run_id, step=step, path=path, fingerprint="", format=fmt,
            status=CheckpointStatus.FAILED.value,
            error=error, discovery_error=error, discovered_at=utcnow(), finished_at=utcnow(),
            analysis_count=0)
        .on_conflict_do_nothing(index_elements=["run_id", "step"]).returning(Checkpoint.id))
    if checkpoint_id is None:
        session.execute(update(Checkpoint).where(
            Checkpoint.run_id == run_id, Checkpoint.step == step,
            Checkpoint.discovery_error.is_distinct_from(error)).values(discovery_error=error))
        return None
    session.add(AnalysisJob(checkpoint_id=checkpoint_id, status=JobStatus.FAILED.value,
                            last_error=error))
    session.flush()
    return int(checkpoint_id)


@dataclass(frozen=True)
class KnownCheckpoint:
    """What discovery compares a checkpoint found on disk with."""

    checkpoint_id: int
    path: str
    fingerprint: str
    status: CheckpointStatus
    job_status: JobStatus | None
    discovery_error: str | None


def known_checkpoints(session: Session, *, run_id: int) -> dict[int, KnownCheckpoint]:
    """Every registered checkpoint of a run by step, in one query."""
    rows = session.execute(
        select(Checkpoint.step, Checkpoint.id, Checkpoint.path, Checkpoint.fingerprint,
               Checkpoint.status, AnalysisJob.status, Checkpoint.discovery_error)
        .outerjoin(AnalysisJob).where(Checkpoint.run_id == run_id)
    ).all()
    return {int(r[0]): KnownCheckpoint(int(r[1]), r[2], r[3], CheckpointStatus(r[4]),
                                       None if r[5] is None else JobStatus(r[5]), r[6])
            for r in rows}


def requeue_rewritten(session: Session, *, checkpoint_id: int, fingerprint: str) -> bool:
    """Queue a finished checkpoint whose files changed in place; False when it is not finished.

    Its stored results stay until the new analysis replaces them in one transaction
    (:func:`complete`); meanwhile it is ``pending`` again, so trends leave it out rather than
    show numbers of files that no longer exist. A job queued or running is left alone (and
    the stored fingerprint with it): the next pass sees the change again once it ends.
    """
    finished = TRANSITIONS[Event.REQUEUE].sources
    job = session.scalars(select(AnalysisJob).where(
        AnalysisJob.checkpoint_id == checkpoint_id,
        AnalysisJob.status.in_([s.value for s in finished]))).first()
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        return False
    if job is None:
        if checkpoint.status in (CheckpointStatus.PENDING, CheckpointStatus.RUNNING):
            return False
        # A finished checkpoint without a job (made before jobs were kept): give it a finished one.
        job = AnalysisJob(checkpoint_id=checkpoint_id, status=JobStatus.FAILED.value)
        session.add(job)
    move(job, checkpoint, Event.REQUEUE)
    job.attempts, job.worker_id, job.last_error, job.lease_expires_at = 0, None, None, None
    checkpoint.fingerprint, checkpoint.rewritten_at = fingerprint, utcnow()
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
       SET status = :running, worker_id = :worker, attempts = attempts + 1,
           lease_expires_at = :lease, heartbeat_at = :now
     WHERE id = (
           -- the oldest queued job; SKIP LOCKED passes over rows another claimer is taking
           -- right now instead of waiting for its transaction, so claimers never block
           SELECT id FROM analysis_job
            WHERE status = :queued
            ORDER BY id
            LIMIT 1
              FOR UPDATE SKIP LOCKED)
    RETURNING id, checkpoint_id, attempts
    """
)


def claim(session: Session, *, worker_id: str, lease_s: float) -> ClaimedJob | None:
    """Take the oldest queued job with a lease of ``lease_s`` seconds; commits at once."""
    now = utcnow()
    lease = now + timedelta(seconds=lease_s)
    claiming = TRANSITIONS[Event.CLAIM]
    if session.get_bind().dialect.name == "postgresql":
        (queued,) = claiming.sources
        row = session.execute(
            _CLAIM_POSTGRES, {"worker": worker_id, "lease": lease, "now": now,
                              "running": claiming.job.value, "queued": queued.value},
        ).first()
        if row is None:
            session.commit()
            return None
        job_id, checkpoint_id, attempts = int(row[0]), int(row[1]), int(row[2])
    else:
        job = session.scalars(
            select(AnalysisJob).where(AnalysisJob.status.in_([s.value for s in claiming.sources]))
            .order_by(AnalysisJob.id).limit(1)
        ).first()
        if job is None:
            session.commit()
            return None
        move(job, None, Event.CLAIM)
        job.worker_id = worker_id
        job.attempts += 1
        job.lease_expires_at, job.heartbeat_at = lease, now
        job_id, checkpoint_id, attempts = job.id, job.checkpoint_id, job.attempts
    checkpoint = session.get(Checkpoint, checkpoint_id)
    assert checkpoint is not None  # the foreign key guarantees it
    # The job row moved in SQL above (PostgreSQL) or through move(); its checkpoint follows.
    checkpoint.status, checkpoint.started_at = claiming.checkpoint.value, now
    # Commit now: the lease must be visible to other workers before the long analysis starts.
    session.commit()
    return ClaimedJob(job_id=job_id, checkpoint_id=checkpoint_id, run_id=checkpoint.run_id,
                      step=checkpoint.step, path=checkpoint.path, attempts=attempts)


def reclaim(session: Session, *, worker_id: str, lease_s: float) -> ClaimedJob | None:
    """A job running under ``worker_id`` that the worker does not know it holds; commits.

    A claim whose commit went through while its answer was lost with the connection leaves
    such a job. A worker that holds no job (it analyses one at a time) takes it back as it is,
    with a new lease and the attempt counted once, instead of leaving its lease to run out and
    cost a second attempt. None when there is no such job.
    """
    now = utcnow()
    job = session.scalars(select(AnalysisJob).where(
        AnalysisJob.worker_id == worker_id, AnalysisJob.status == JobStatus.RUNNING.value)
        .order_by(AnalysisJob.id).limit(1)).first()
    if job is None:
        return None
    job.lease_expires_at, job.heartbeat_at = now + timedelta(seconds=lease_s), now
    checkpoint = session.get(Checkpoint, job.checkpoint_id)
    assert checkpoint is not None  # the foreign key guarantees it
    session.commit()
    return ClaimedJob(job_id=job.id, checkpoint_id=job.checkpoint_id, run_id=checkpoint.run_id,
                      step=checkpoint.step, path=checkpoint.path, attempts=job.attempts)


_WORK = select(
    select(AnalysisJob.id).where(AnalysisJob.status == JobStatus.QUEUED.value).exists()
    | select(AnalysisJob.id).where(AnalysisJob.status == JobStatus.RUNNING.value,
                                   AnalysisJob.lease_expires_at < bindparam("now")).exists())


def has_work(session: Session | Connection) -> bool:
    """Whether a claim could find something: a job queued, or one whose lease ran out.

    One indexed query (``ix_analysis_job_status_lease``) that writes nothing: what an idle
    worker asks each poll before it recovers stale jobs and claims (:func:`requeue_stale`,
    :func:`claim`), which lock and write.
    """
    return bool(session.execute(_WORK, {"now": utcnow()}).scalar())


def heartbeat(session: Session, *, job_id: int, worker_id: str, lease_s: float) -> bool:
    """Extend the lease; False when this worker no longer holds the job."""
    now = utcnow()
    result = session.execute(
        update(AnalysisJob)
        .where(AnalysisJob.id == job_id, AnalysisJob.worker_id == worker_id,
               AnalysisJob.status == JobStatus.RUNNING.value)
        .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
    )
    return bool(getattr(result, "rowcount", 0))


def _held(session: Session, job_id: int, worker_id: str) -> AnalysisJob | None:
    query = select(AnalysisJob).where(
        AnalysisJob.id == job_id, AnalysisJob.worker_id == worker_id,
        AnalysisJob.status == JobStatus.RUNNING.value,
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return session.scalars(query).first()


def complete(
    session: Session,
    *,
    job_id: int,
    worker_id: str,
    layers: Sequence[LayerRow],
    spectra: Sequence[SpectrumRow],
    device: str,
    elapsed_s: float,
    thresholds: Thresholds,
    gate: GateCheck | None = None,
) -> bool:
    """Write every layer row, spectrum, robust statistic and the checkpoint summary at once.

    One transaction: a reader sees the checkpoint either not analysed or complete. Re-analysis
    replaces earlier rows of the same checkpoint and method. With ``gate``, the run's gate
    verdict is recorded in the same transaction, and an alert queued when it changed
    (:mod:`alphawatch.service.db.alerts`). Returns False (and writes nothing) when the lease was
    lost to another worker.
    """
    job = _held(session, job_id, worker_id)
    if job is None:
        return False
    checkpoint_id = job.checkpoint_id
    methods = {layer.method for layer in layers}
    session.execute(delete(LayerMetric).where(LayerMetric.checkpoint_id == checkpoint_id,
                                              LayerMetric.method.in_(methods)))
    session.execute(delete(CheckpointStat).where(CheckpointStat.checkpoint_id == checkpoint_id,
                                                 CheckpointStat.method.in_(methods)))
    by_name = {(s.name, s.method): s for s in spectra}
    values = [layer.values() for layer in layers]
    for layer, columns in zip(layers, values, strict=True):
        row = LayerMetric(checkpoint_id=checkpoint_id, **columns)
        session.add(row)
        session.flush()
        spectrum = by_name.get((layer.name, layer.method))
        if spectrum is not None and spectrum.evals is not None:
            session.add(Spectrum(layer_metric_id=row.id, evals=spectrum.evals,
                                 rand_evals=spectrum.rand_evals))
    summaries = stat_rows(values, checkpoint_id=checkpoint_id, thresholds=thresholds)
    if summaries:
        session.execute(insert(CheckpointStat), summaries)
    checkpoint = session.get(Checkpoint, checkpoint_id)
    assert checkpoint is not None
    move(job, checkpoint, Event.COMPLETE)
    checkpoint.error = None
    checkpoint.finished_at, checkpoint.analysis_s, checkpoint.device = utcnow(), elapsed_s, device
    weights = weight_rows(values)  # what the checkpoint's counts and statistics are about
    checkpoint.n_layers = len(weights)
    checkpoint.analysis_count += 1
    checkpoint.n_trusted = sum(1 for layer in weights if layer.get("trusted"))
    job.lease_expires_at, job.last_error = None, None
    if gate is not None:
        try:
            # A savepoint: a gate that cannot be evaluated never costs the results.
            with session.begin_nested():
                record_verdict(session, run_id=checkpoint.run_id, check=gate)
        except Exception as exc:
            # A lost connection took the whole transaction with it, results included: swallowed
            # here, the commit would fail as PendingRollbackError; raised, the caller writes the
            # results again on a fresh connection.
            if is_connection_error(exc):
                raise
            log.exception("the gate of run %s could not be evaluated after step %s",
                          checkpoint.run_id, checkpoint.step)
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
        move(job, checkpoint, Event.VANISH)
    else:
        move(job, checkpoint, Event.GIVE_UP if job.attempts >= max_attempts else Event.RETRY)
    job.worker_id, job.lease_expires_at = None, None
    checkpoint.finished_at = utcnow()


def requeue_stale(session: Session, *, max_attempts: int = 3) -> int:
    """Recover jobs whose lease ran out (a dead or hung worker); returns how many.

    Every claim counted an attempt, so a checkpoint that kills its worker each time (out of
    memory, a crash in native code) ends ``failed`` after ``max_attempts`` instead of going back
    to the queue for ever.
    """
    now = utcnow()
    query = select(AnalysisJob).where(AnalysisJob.status == JobStatus.RUNNING.value,
                                      AnalysisJob.lease_expires_at < now)
    if session.get_bind().dialect.name == "postgresql":
        # Two workers recovering at once: the second re-checks the row after the first commits
        # (or skips it while locked) instead of overwriting a claim made in between.
        query = query.with_for_update(skip_locked=True)
    stale = session.scalars(query).all()
    for job in stale:
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        died = (f"the worker analysing it died or hung (lease expired without a heartbeat) "
                f"on attempt {job.attempts}")
        if job.attempts >= max_attempts:
            error = f"given up after {job.attempts} attempts: {died}"
            if job.last_error and "lease expired" not in job.last_error:
                error += f"; an earlier attempt: {job.last_error}"
            move(job, checkpoint, Event.GIVE_UP)
            if checkpoint is not None:
                checkpoint.error, checkpoint.finished_at = error, now
        else:
            error = died
            move(job, checkpoint, Event.RETRY)
        job.worker_id, job.lease_expires_at, job.last_error = None, None, error
    return len(stale)


def reanalyze(session: Session, *, run_id: int, step: int | None = None) -> int:
    """Queue finished checkpoints of a run again; returns how many."""
    query = select(AnalysisJob).join(Checkpoint).where(
        Checkpoint.run_id == run_id,
        AnalysisJob.status.in_([s.value for s in TRANSITIONS[Event.REQUEUE].sources]),
    )
    if step is not None:
        query = query.where(Checkpoint.step == step)
    jobs = session.scalars(query).all()
    for job in jobs:
        move(job, session.get(Checkpoint, job.checkpoint_id), Event.REQUEUE)
        job.attempts, job.worker_id = 0, None
    return len(jobs)


def queue_depth(session: Session) -> int:
    return int(session.scalar(
        select(func.count()).select_from(AnalysisJob)
        .where(AnalysisJob.status == JobStatus.QUEUED.value)
    ) or 0)
