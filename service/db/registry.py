"""The registry of runs and checkpoints: registering them, what discovery knows, its errors.

Each new checkpoint is registered with its queued analysis job (the job state machine is
:mod:`~alphawatch.service.db.queue`); the discovery lease and "scan now" requests are in
:mod:`~alphawatch.service.db.scans`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import Connection, select, update
from sqlalchemy.orm import Session

from alphawatch.service.db.models import AnalysisJob, Checkpoint, CheckpointStatus, JobStatus, Run
from alphawatch.service.db.queue import TRANSITIONS, Event, move
from alphawatch.service.db.session import dialect_insert, utcnow

_REGISTERED = select(Run.id, Run.path).order_by(Run.id)


def registered_runs(session: Session | Connection) -> list[tuple[int, str]]:
    """Every registered run's id and folder, by id (one query)."""
    return [(int(run_id), path) for run_id, path in session.execute(_REGISTERED).all()]


def first_checkpoint(session: Session, *, run_id: int) -> str | None:
    """The path of the run's registered checkpoint with the lowest step; None when it has none.

    The analysis measures each checkpoint's distance from init against this one.
    """
    return session.scalars(
        select(Checkpoint.path)
        .where(Checkpoint.run_id == run_id)
        .order_by(Checkpoint.step)
        .limit(1)
    ).first()


def earlier_checkpoints(
    session: Session, *, run_id: int, step: int, limit: int = 8
) -> list[tuple[int, str]]:
    """(step, path) of the run's registered checkpoints before ``step``, the latest first.

    The update spectra ``@delta_prev`` and the layer distances compare a checkpoint with the
    one before it by step (whatever order they are analysed in), the first of these whose files
    still exist: rotation may have deleted the ones the database still lists.
    """
    rows = session.execute(
        select(Checkpoint.step, Checkpoint.path)
        .where(
            Checkpoint.run_id == run_id,
            Checkpoint.step < step,
            Checkpoint.status != CheckpointStatus.VANISHED,
        )
        .order_by(Checkpoint.step.desc())
        .limit(limit)
    )
    return [(int(s), str(p)) for s, p in rows]


def is_newest(session: Session, *, run_id: int, step: int) -> bool:
    """Whether no checkpoint of the run after ``step`` is registered (vanished ones aside): a
    checkpoint analysed now is then the next one's base for update spectra."""
    later = session.scalar(
        select(Checkpoint.id)
        .where(
            Checkpoint.run_id == run_id,
            Checkpoint.step > step,
            Checkpoint.status != CheckpointStatus.VANISHED,
        )
        .limit(1)
    )
    return later is None


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
            dialect_insert(session, Run)
            .values(name=unique, path=path, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["name"])
            .returning(Run.id)
        )
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
        return stem[: _RUN_NAME_MAX - len(suffix)] + suffix

    yield within(name, "")
    for n in range(2, 100):
        yield within(name, f"-{n}")
    yield within(name, "-" + hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:8])
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
        dialect_insert(session, Checkpoint)
        .values(
            run_id=run_id,
            step=step,
            path=path,
            fingerprint=fingerprint,
            format=fmt,
            status=CheckpointStatus.PENDING.value,
            discovered_at=utcnow(),
            analysis_count=0,
        )
        .on_conflict_do_nothing(index_elements=["run_id", "step"])
        .returning(Checkpoint.id)
    )
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
        dialect_insert(session, Checkpoint)
        .values(
            run_id=run_id,
            step=step,
            path=path,
            fingerprint="",
            format=fmt,
            status=CheckpointStatus.FAILED.value,
            error=error,
            discovery_error=error,
            discovered_at=utcnow(),
            finished_at=utcnow(),
            analysis_count=0,
        )
        .on_conflict_do_nothing(index_elements=["run_id", "step"])
        .returning(Checkpoint.id)
    )
    if checkpoint_id is None:
        session.execute(
            update(Checkpoint)
            .where(
                Checkpoint.run_id == run_id,
                Checkpoint.step == step,
                Checkpoint.discovery_error.is_distinct_from(error),
            )
            .values(discovery_error=error)
        )
        return None
    session.add(
        AnalysisJob(checkpoint_id=checkpoint_id, status=JobStatus.FAILED.value, last_error=error)
    )
    session.flush()
    return int(checkpoint_id)


@dataclass(frozen=True)
class KnownCheckpoint:
    """What discovery compares a checkpoint found on disk with."""

    checkpoint_id: int
    path: str
    fingerprint: str
    format: str
    status: CheckpointStatus
    job_status: JobStatus | None
    discovery_error: str | None


def known_checkpoints(session: Session, *, run_id: int) -> dict[int, KnownCheckpoint]:
    """Every registered checkpoint of a run by step, in one query."""
    rows = session.execute(
        select(
            Checkpoint.step,
            Checkpoint.id,
            Checkpoint.path,
            Checkpoint.fingerprint,
            Checkpoint.format,
            Checkpoint.status,
            AnalysisJob.status,
            Checkpoint.discovery_error,
        )
        .outerjoin(AnalysisJob)
        .where(Checkpoint.run_id == run_id)
    ).all()
    return {
        int(r[0]): KnownCheckpoint(
            int(r[1]),
            r[2],
            r[3],
            r[4],
            CheckpointStatus(r[5]),
            None if r[6] is None else JobStatus(r[6]),
            r[7],
        )
        for r in rows
    }


def requeue_rewritten(session: Session, *, checkpoint_id: int, fingerprint: str) -> bool:
    """Queue a finished checkpoint whose files changed in place; False when it is not finished.

    Its stored results stay until the new analysis replaces them in one transaction
    (:func:`complete`); meanwhile it is ``pending`` again, so trends leave it out rather than
    show numbers of files that no longer exist. A job queued or running is left alone (and
    the stored fingerprint with it): the next pass sees the change again once it ends.
    """
    # A skipped checkpoint is not finished: it reads the new files whenever it is re-queued.
    finished = TRANSITIONS[Event.REQUEUE].sources - {JobStatus.SKIPPED}
    job = session.scalars(
        select(AnalysisJob).where(
            AnalysisJob.checkpoint_id == checkpoint_id,
            AnalysisJob.status.in_([s.value for s in finished]),
        )
    ).first()
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        return False
    if job is None:
        if checkpoint.status in (
            CheckpointStatus.PENDING,
            CheckpointStatus.RUNNING,
            CheckpointStatus.SKIPPED,
        ):
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
    session.execute(
        update(Checkpoint).where(Checkpoint.id == checkpoint_id).values(fingerprint=fingerprint)
    )


def set_run_discovery_error(session: Session, *, run_id: int, error: str | None) -> None:
    """Record (or, with None, clear) why discovery could not list a run or refused entries."""
    session.execute(
        update(Run)
        .where(Run.id == run_id, Run.discovery_error.is_distinct_from(error))
        .values(discovery_error=error)
    )


def set_checkpoint_discovery_error(
    session: Session, *, checkpoint_id: int, error: str | None
) -> None:
    """Record (or, with None, clear) what discovery found wrong with a registered checkpoint."""
    session.execute(
        update(Checkpoint)
        .where(Checkpoint.id == checkpoint_id, Checkpoint.discovery_error.is_distinct_from(error))
        .values(discovery_error=error)
    )
