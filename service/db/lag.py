"""How far analysis is behind training: waiting checkpoints per run and the queue's backlog.

A checkpoint waits from the moment it was queued: when discovery found it
(``discovered_at``), or, when its files were rewritten after an analysis and it was queued
again, from ``rewritten_at``. Every function here costs one grouped query, whatever the number
of runs, so the run list and ``/metrics`` stay a bounded number of statements.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from alphawatch.service.db.models import AnalysisJob, Checkpoint, CheckpointStatus, JobStatus, Run

WAITING = (CheckpointStatus.PENDING.value, CheckpointStatus.RUNNING.value)
# A rewritten checkpoint was queued again at rewritten_at; its first discovery is history.
QUEUED_SINCE = func.coalesce(Checkpoint.rewritten_at, Checkpoint.discovered_at)


def aware(moment: datetime) -> datetime:
    """``moment`` as a UTC-aware datetime (SQLite hands timestamps back naive)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def seconds_since(moment: datetime | None, now: datetime) -> float | None:
    """Seconds from ``moment`` to ``now``, never negative (clocks of two hosts drift); None for
    None."""
    return None if moment is None else max(0.0, (now - aware(moment)).total_seconds())


@dataclass(frozen=True)
class Waiting:
    """A run's checkpoints waiting for analysis (queued or being analysed)."""

    run: str  # the run's name
    checkpoints: int
    oldest_since: datetime | None  # when the longest-waiting one was queued; None when none


@dataclass(frozen=True)
class Backlog:
    """The whole queue: jobs no worker has claimed yet."""

    queued: int
    oldest_since: datetime | None  # when the longest-queued one was queued; None when empty


def waiting(session: Session, *, run_ids: Collection[int] | None = None) -> dict[int, Waiting]:
    """Every run (or those of ``run_ids``) by id, with its waiting checkpoints (one query)."""
    statement = (
        select(Run.id, Run.name, func.count(Checkpoint.id), func.min(QUEUED_SINCE))
        .select_from(Run)
        .outerjoin(Checkpoint, and_(Checkpoint.run_id == Run.id, Checkpoint.status.in_(WAITING)))
        .group_by(Run.id, Run.name)
    )
    if run_ids is not None:
        statement = statement.where(Run.id.in_(run_ids))
    return {
        int(run_id): Waiting(
            run=name, checkpoints=int(count), oldest_since=None if since is None else aware(since)
        )
        for run_id, name, count, since in session.execute(statement)
    }


def last_analysis_lags(session: Session, *, run_ids: Collection[int]) -> dict[int, float]:
    """Seconds from queued to analysed of each run's most recently finished analysis (one
    query); runs with nothing analysed are absent."""
    done = Checkpoint.status == CheckpointStatus.DONE.value
    latest = (
        select(Checkpoint.run_id, func.max(Checkpoint.finished_at).label("at"))
        .where(done, Checkpoint.run_id.in_(run_ids))
        .group_by(Checkpoint.run_id)
        .subquery()
    )
    lags: dict[int, float] = {}
    for run_id, finished, since in session.execute(
        select(Checkpoint.run_id, Checkpoint.finished_at, QUEUED_SINCE)
        .join(
            latest,
            and_(Checkpoint.run_id == latest.c.run_id, Checkpoint.finished_at == latest.c.at),
        )
        .where(done)
    ):
        lag = None if finished is None else seconds_since(since, aware(finished))
        if lag is not None:
            # Two analyses finished at the same instant: the longer wait is the one to see.
            lags[int(run_id)] = max(lag, lags.get(int(run_id), 0.0))
    return lags


def backlog(session: Session) -> Backlog:
    """How many jobs are queued and since when the oldest waits (one query)."""
    count, since = session.execute(
        select(func.count(), func.min(QUEUED_SINCE))
        .select_from(AnalysisJob)
        .join(Checkpoint, Checkpoint.id == AnalysisJob.checkpoint_id)
        .where(AnalysisJob.status == JobStatus.QUEUED.value)
    ).one()
    return Backlog(queued=int(count), oldest_since=None if since is None else aware(since))
