"""Leases that ran out are recovered by one rule for jobs and alert deliveries alike."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from alphawatch.service.db import alerts, queue
from alphawatch.service.db.leases import lapsed
from alphawatch.service.db.models import Alert, AlertStatus, AnalysisJob, JobStatus
from alphawatch.service.db.session import make_engine, session_scope, utcnow
from tests.factories import register_run


def _alert(session: Session, run_id: int, *, lease_in_s: float, attempts: int) -> int:
    row = Alert(
        run_id=run_id,
        step=1,
        passed=False,
        payload="{}",
        status=AlertStatus.SENDING.value,
        attempts=attempts,
        worker_id="gone",
        lease_expires_at=utcnow() + timedelta(seconds=lease_in_s),
    )
    session.add(row)
    session.flush()
    return row.id


def test_an_alert_whose_sender_died_is_due_again_and_a_held_one_is_left(db_url: str) -> None:
    run_id = register_run(db_url, name="r", steps=[1])
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        dead = _alert(session, run_id, lease_in_s=-5, attempts=1)
        held = _alert(session, run_id, lease_in_s=600, attempts=1)
    with session_scope(engine) as session:
        assert [a.id for a in lapsed(session, Alert, status="sending", now=utcnow())] == [dead]
        assert alerts.recover_stale(session, max_attempts=3) == 1
    with session_scope(engine) as session:
        by_id = {a.id: a for a in session.scalars(select(Alert))}
        assert by_id[held].status == AlertStatus.SENDING.value
        assert by_id[held].worker_id == "gone"
        # The older alert of the run is superseded by the newer one, never sent after it.
        assert by_id[dead].status in (AlertStatus.PENDING.value, AlertStatus.SUPERSEDED.value)
        assert by_id[dead].worker_id is None and by_id[dead].lease_expires_at is None


def _status(session: Session, job_id: int) -> str:
    job = session.get(AnalysisJob, job_id)
    assert job is not None
    return job.status


def test_a_job_whose_worker_died_is_queued_again_and_a_held_one_is_left(db_url: str) -> None:
    register_run(db_url, name="r", steps=[1, 2])
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        first = queue.claim(session, worker_id="gone", lease_s=60)
    with session_scope(engine) as session:
        second = queue.claim(session, worker_id="alive", lease_s=600)
    assert first is not None and second is not None
    with session_scope(engine) as session:
        job = session.get(AnalysisJob, first.job_id)
        assert job is not None
        job.lease_expires_at = utcnow() - timedelta(seconds=5)
    with session_scope(engine) as session:
        found = lapsed(session, AnalysisJob, status=JobStatus.RUNNING.value, now=utcnow())
        assert [j.id for j in found] == [first.job_id]
        assert queue.requeue_stale(session, max_attempts=3) == 1
    with session_scope(engine) as session:
        assert _status(session, first.job_id) == JobStatus.QUEUED.value
        assert _status(session, second.job_id) == JobStatus.RUNNING.value
