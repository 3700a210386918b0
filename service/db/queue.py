"""The analysis job queue: the job state machine; claim with a lease, heartbeat, fail, recover.

Runs and checkpoints are registered in :mod:`~alphawatch.service.db.registry`; a job's results
are written by :mod:`~alphawatch.service.db.results`, which completes it.

PostgreSQL: a claim is one ``UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED) RETURNING``
committed at once, so any number of workers share the queue without blocking each other and the
analysis runs outside any transaction. SQLite has a single writer; the same functions run there
as plain transactions (one worker per database file).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

from sqlalchemy import Connection, TextClause, select, text, update
from sqlalchemy.orm import Session

from alphawatch.service.db.leases import lapsed
from alphawatch.service.db.models import (
    AnalysisJob,
    Checkpoint,
    CheckpointStatus,
    JobStatus,
    Run,
)
from alphawatch.service.db.session import utcnow

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
    REQUEUE = "requeue"  # a finished or skipped checkpoint is to be analysed (again)
    SKIP = "skip"  # the keep-up policy passes a queued checkpoint over (see keep_up)
    RELEASE = "release"  # its worker was told to stop: the job goes back, attempt not counted


@dataclass(frozen=True)
class Transition:
    """From which job statuses an event may happen, and the pair of statuses it leads to."""

    sources: frozenset[JobStatus]
    job: JobStatus
    checkpoint: CheckpointStatus


_RUNNING = frozenset({JobStatus.RUNNING})

# The one state machine of jobs and checkpoints: nothing else assigns either status.
TRANSITIONS: dict[Event, Transition] = {
    Event.CLAIM: Transition(
        frozenset({JobStatus.QUEUED}), JobStatus.RUNNING, CheckpointStatus.RUNNING
    ),
    Event.COMPLETE: Transition(_RUNNING, JobStatus.DONE, CheckpointStatus.DONE),
    Event.RETRY: Transition(_RUNNING, JobStatus.QUEUED, CheckpointStatus.PENDING),
    Event.GIVE_UP: Transition(_RUNNING, JobStatus.FAILED, CheckpointStatus.FAILED),
    Event.VANISH: Transition(_RUNNING, JobStatus.FAILED, CheckpointStatus.VANISHED),
    Event.REQUEUE: Transition(
        frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.SKIPPED}),
        JobStatus.QUEUED,
        CheckpointStatus.PENDING,
    ),
    Event.SKIP: Transition(
        frozenset({JobStatus.QUEUED}), JobStatus.SKIPPED, CheckpointStatus.SKIPPED
    ),
    Event.RELEASE: Transition(_RUNNING, JobStatus.QUEUED, CheckpointStatus.PENDING),
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


_CLAIM_POSTGRES = text(
    """
    UPDATE analysis_job
       SET status = :running, worker_id = :worker, attempts = attempts + 1,
           lease_expires_at = :lease, heartbeat_at = :now
     WHERE id = (
           -- the run served longest ago first, then its backlog in order (see claim); SKIP
           -- LOCKED passes over rows another claimer is taking right now instead of waiting
           -- for its transaction, so claimers never block
           SELECT j.id FROM analysis_job j
             JOIN checkpoint c ON c.id = j.checkpoint_id
             JOIN run r ON r.id = c.run_id
            WHERE j.status = :queued
            ORDER BY r.last_claimed_at NULLS FIRST, j.priority, j.id
            LIMIT 1
              FOR UPDATE OF j SKIP LOCKED)
    RETURNING id, checkpoint_id, attempts
    """
)


def claim(session: Session, *, worker_id: str, lease_s: float) -> ClaimedJob | None:
    """Take the next queued job with a lease of ``lease_s`` seconds; commits at once.

    The next job is one of the run whose last claim is oldest (a run never claimed first), so
    runs are served in turn and one run's backlog never holds back another run's new
    checkpoint; within the run, the lowest :func:`reorder` priority (its newest step, then
    coarse to fine), then the oldest job. The queued rows are found through the status index;
    the sort covers only them.
    """
    now = utcnow()
    lease = now + timedelta(seconds=lease_s)
    claiming = TRANSITIONS[Event.CLAIM]
    if session.get_bind().dialect.name == "postgresql":
        (queued,) = claiming.sources
        row = session.execute(
            _CLAIM_POSTGRES,
            {
                "worker": worker_id,
                "lease": lease,
                "now": now,
                "running": claiming.job.value,
                "queued": queued.value,
            },
        ).first()
        if row is None:
            session.commit()
            return None
        job_id, checkpoint_id, attempts = int(row[0]), int(row[1]), int(row[2])
    else:
        job = session.scalars(
            select(AnalysisJob)
            .join(Checkpoint, Checkpoint.id == AnalysisJob.checkpoint_id)
            .join(Run, Run.id == Checkpoint.run_id)
            .where(AnalysisJob.status.in_([s.value for s in claiming.sources]))
            .order_by(Run.last_claimed_at.nulls_first(), AnalysisJob.priority, AnalysisJob.id)
            .limit(1)
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
    session.execute(update(Run).where(Run.id == checkpoint.run_id).values(last_claimed_at=now))
    # Commit now: the lease must be visible to other workers before the long analysis starts.
    session.commit()
    return ClaimedJob(
        job_id=job_id,
        checkpoint_id=checkpoint_id,
        run_id=checkpoint.run_id,
        step=checkpoint.step,
        path=checkpoint.path,
        attempts=attempts,
    )


def coarse_to_fine(n: int) -> list[int]:
    """The indices ``0 .. n-1`` of a run's steps in the order its backlog is analysed.

    The last (newest) first, then the first, then the middle, then the quarters, the eighths …
    (each round halves every gap left, left to right), so that a trend drawn from what is done
    so far spans the whole run early and sharpens. For 9: 8, 0, 4, 2, 6, 1, 3, 5, 7.
    """
    if n <= 0:
        return []
    order = [n - 1] + ([0] if n > 1 else [])
    gaps = deque([(0, n - 1)])
    while gaps:
        lo, hi = gaps.popleft()
        if hi - lo >= 2:
            mid = (lo + hi) // 2
            order.append(mid)
            gaps.extend(((lo, mid), (mid, hi)))
    return order


def reorder(session: Session, *, run_id: int) -> int:
    """Give each queued job of a run its place in :func:`coarse_to_fine`; returns how many moved.

    Places are among all the run's registered steps, so they shift when a step is added: the
    discovering worker calls this once per pass that registered or queued something in the run
    (one query over the run's checkpoints, and one write of the jobs whose place changed).
    """
    rows = session.execute(
        select(AnalysisJob.id, AnalysisJob.status, AnalysisJob.priority)
        .select_from(Checkpoint)
        .outerjoin(AnalysisJob, AnalysisJob.checkpoint_id == Checkpoint.id)
        .where(Checkpoint.run_id == run_id)
        .order_by(Checkpoint.step)
    ).all()
    place = {index: rank for rank, index in enumerate(coarse_to_fine(len(rows)))}
    moved = [
        {"id": job_id, "priority": place[index]}
        for index, (job_id, status, priority) in enumerate(rows)
        if job_id is not None and status == JobStatus.QUEUED.value and priority != place[index]
    ]
    if moved:
        session.execute(update(AnalysisJob), moved)
    return len(moved)


def keep_up(session: Session, *, run_id: int, bound: int) -> int:
    """Skip the run's queued jobs that come after the first ``bound`` in its claim order.

    The keep-up policy (``ALPHAWATCH_KEEP_UP``): a worker that cannot analyse every checkpoint
    of a run keeps at most ``bound`` of them queued, the ones it would claim first (lowest
    :func:`reorder` priority: the newest step, then the first, the middle, the quarters …),
    and moves the rest to ``skipped`` through :func:`move`, each with a note saying why; a
    checkpoint analysed before is queued again only on request (a re-analysis, files rewritten)
    and is never skipped. Call it after :func:`reorder`, so that the places are current.
    Returns how many were skipped.

    Only the jobs to skip are locked, and those a claimer holds at that moment are passed over
    (PostgreSQL ``SKIP LOCKED``): a job claimed meanwhile is running, never skipped.
    """
    if bound <= 0:
        return 0
    of_run_queued = (
        Checkpoint.run_id == run_id,
        AnalysisJob.status == JobStatus.QUEUED.value,
    )
    queued = (
        session.execute(
            select(AnalysisJob.id)
            .join(Checkpoint, Checkpoint.id == AnalysisJob.checkpoint_id)
            .where(*of_run_queued)
            .order_by(AnalysisJob.priority, AnalysisJob.id)
        )
        .scalars()
        .all()
    )
    if len(queued) <= bound:
        return 0
    query = (
        select(AnalysisJob, Checkpoint)
        .join(Checkpoint, Checkpoint.id == AnalysisJob.checkpoint_id)
        .where(
            *of_run_queued,
            AnalysisJob.id.not_in(queued[:bound]),
            # Analysed before (queued again for a re-analysis, or because its files changed):
            # never skipped, which would hide the results it has from trends and the gate.
            Checkpoint.analysis_count == 0,
        )
        .order_by(AnalysisJob.id)
    )
    if session.get_bind().dialect.name == "postgresql":
        # populate_existing: a job this session loaded before is read again as it is locked.
        query = query.with_for_update(of=AnalysisJob, skip_locked=True).execution_options(
            populate_existing=True
        )
    note = (
        f"skipped to keep up: {len(queued)} checkpoints of the run were queued, over "
        f"ALPHAWATCH_KEEP_UP={bound} (a worker with the policy off analyses it)"
    )
    skipped = session.execute(query).all()
    for job, checkpoint in skipped:
        move(job, checkpoint, Event.SKIP)
        checkpoint.error = note
    return len(skipped)


def resume_skipped(session: Session, *, run_id: int) -> int:
    """Queue the run's skipped checkpoints again (the keep-up policy is off); returns how many.

    Call :func:`reorder` after it: the jobs take their places in the claim order.
    """
    skipped = session.execute(
        select(AnalysisJob, Checkpoint)
        .join(Checkpoint, Checkpoint.id == AnalysisJob.checkpoint_id)
        .where(Checkpoint.run_id == run_id, AnalysisJob.status == JobStatus.SKIPPED.value)
    ).all()
    for job, checkpoint in skipped:
        move(job, checkpoint, Event.REQUEUE)
        checkpoint.error = None
    return len(skipped)


def reclaim(session: Session, *, worker_id: str, lease_s: float) -> ClaimedJob | None:
    """A job running under ``worker_id`` that the worker does not know it holds; commits.

    A claim whose commit went through while its answer was lost with the connection leaves
    such a job. A worker that holds no job (it analyses one at a time) takes it back as it is,
    with a new lease and the attempt counted once, instead of leaving its lease to run out and
    cost a second attempt. None when there is no such job.
    """
    now = utcnow()
    job = session.scalars(
        select(AnalysisJob)
        .where(AnalysisJob.worker_id == worker_id, AnalysisJob.status == JobStatus.RUNNING.value)
        .order_by(AnalysisJob.id)
        .limit(1)
    ).first()
    if job is None:
        return None
    job.lease_expires_at, job.heartbeat_at = now + timedelta(seconds=lease_s), now
    checkpoint = session.get(Checkpoint, job.checkpoint_id)
    assert checkpoint is not None  # the foreign key guarantees it
    session.commit()
    return ClaimedJob(
        job_id=job.id,
        checkpoint_id=job.checkpoint_id,
        run_id=checkpoint.run_id,
        step=checkpoint.step,
        path=checkpoint.path,
        attempts=job.attempts,
    )


# The one definition of a claimable job: queued, or running under a lease that ran out (its
# worker died; requeue_stale gives it back at the next claim). The worker asks it before it
# claims (has_work), /metrics reports its count (alphawatch_queue_depth), and a scaler outside
# the process (KEDA's postgresql trigger in deploy/k8s/, which runs QUEUE_DEPTH_SQL verbatim: a
# test holds the manifest to this text) sizes the GPU workers on it. Plain SQL without
# parameters, as a scaler takes it; the database's clock judges the lease (the hosts' clocks
# drift by far less than a lease).
CLAIMABLE_SQL = (
    f"status = '{JobStatus.QUEUED.value}' OR (status = '{JobStatus.RUNNING.value}' "
    "AND lease_expires_at < CURRENT_TIMESTAMP)"
)
QUEUE_DEPTH_SQL = f"SELECT count(*) FROM analysis_job WHERE {CLAIMABLE_SQL}"
_HAS_WORK_SQL = f"SELECT EXISTS (SELECT 1 FROM analysis_job WHERE {CLAIMABLE_SQL})"
# SQLite's CURRENT_TIMESTAMP has whole seconds, and the text it compares with (how SQLAlchemy
# stores a datetime there) has microseconds: the same instant, to the millisecond.
_SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"


def _on(session: Session | Connection, sql: str) -> TextClause:
    """``sql`` in the dialect of ``session``'s database (only the clock differs)."""
    bind = session.get_bind() if isinstance(session, Session) else session
    if bind.dialect.name == "sqlite":
        sql = sql.replace("CURRENT_TIMESTAMP", _SQLITE_NOW)
    return text(sql)


def has_work(session: Session | Connection) -> bool:
    """Whether a claim could find something: a job queued, or one whose lease ran out.

    One indexed query (``ix_analysis_job_status_lease``) that writes nothing: what an idle
    worker asks each poll before it recovers stale jobs and claims (:func:`requeue_stale`,
    :func:`claim`), which lock and write. True exactly when :func:`depth` is above 0.
    """
    return bool(session.execute(_on(session, _HAS_WORK_SQL)).scalar())


def depth(session: Session | Connection) -> int:
    """How many jobs are claimable (:data:`QUEUE_DEPTH_SQL`): ``alphawatch_queue_depth``, and
    the number a scaler starts GPU workers for."""
    return int(session.execute(_on(session, QUEUE_DEPTH_SQL)).scalar_one())


def heartbeat(session: Session, *, job_id: int, worker_id: str, lease_s: float) -> bool:
    """Extend the lease; False when this worker no longer holds the job."""
    now = utcnow()
    result = session.execute(
        update(AnalysisJob)
        .where(
            AnalysisJob.id == job_id,
            AnalysisJob.worker_id == worker_id,
            AnalysisJob.status == JobStatus.RUNNING.value,
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
    )
    return bool(getattr(result, "rowcount", 0))


def held(session: Session, job_id: int, worker_id: str) -> AnalysisJob | None:
    query = select(AnalysisJob).where(
        AnalysisJob.id == job_id,
        AnalysisJob.worker_id == worker_id,
        AnalysisJob.status == JobStatus.RUNNING.value,
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return session.scalars(query).first()


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
    job = held(session, job_id, worker_id)
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


def release(session: Session, *, job_id: int, worker_id: str) -> bool:
    """Give a held job back to the queue at once, its attempt not counted; False when this
    worker no longer holds it.

    A worker told to stop (SIGTERM from a scheduler scaling down) that cannot finish the job in
    hand within its grace period stops the analysis and calls this, so another worker claims
    the job now instead of after the lease runs out, and a stop never uses up an attempt.
    """
    job = held(session, job_id, worker_id)
    if job is None:
        return False
    checkpoint = session.get(Checkpoint, job.checkpoint_id)
    move(job, checkpoint, Event.RELEASE)
    job.attempts = max(0, job.attempts - 1)
    job.worker_id, job.lease_expires_at = None, None
    if checkpoint is not None:
        checkpoint.started_at = None
    return True


def requeue_stale(session: Session, *, max_attempts: int = 3) -> int:
    """Recover jobs whose lease ran out (a dead or hung worker); returns how many.

    Every claim counted an attempt, so a checkpoint that kills its worker each time (out of
    memory, a crash in native code) ends ``failed`` after ``max_attempts`` instead of going back
    to the queue for ever.
    """
    now = utcnow()
    stale = lapsed(session, AnalysisJob, status=JobStatus.RUNNING.value, now=now)
    for job in stale:
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        died = (
            f"the worker analysing it died or hung (lease expired without a heartbeat) "
            f"on attempt {job.attempts}"
        )
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
    """Queue finished (and skipped) checkpoints of a run again; returns how many."""
    query = (
        select(AnalysisJob)
        .join(Checkpoint)
        .where(
            Checkpoint.run_id == run_id,
            AnalysisJob.status.in_([s.value for s in TRANSITIONS[Event.REQUEUE].sources]),
        )
    )
    if step is not None:
        query = query.where(Checkpoint.step == step)
    jobs = session.scalars(query).all()
    for job in jobs:
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        if checkpoint is not None and job.status == JobStatus.SKIPPED.value:
            checkpoint.error = None  # the keep-up note: it is no longer skipped
        move(job, checkpoint, Event.REQUEUE)
        job.attempts, job.worker_id = 0, None
    return len(jobs)
