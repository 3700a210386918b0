"""The job queue on real databases: exclusive claims, lease recovery, bounded retries."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from alphawatch.service.db import queue, registry, results
from alphawatch.service.db.models import (
    AnalysisJob,
    Checkpoint,
    CheckpointStatus,
    JobStatus,
    LayerMetric,
)
from alphawatch.service.db.rows import LayerRow
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.trust import Thresholds


def _fill(url: str, n: int) -> None:
    with session_scope(make_engine(url)) as session:
        run = registry.ensure_run(session, name="r", path="/runs/r")
        for step in range(n):
            assert (
                registry.register_checkpoint(
                    session,
                    run_id=run,
                    step=step,
                    path=f"/runs/r/{step}",
                    fingerprint="f",
                    fmt="hf",
                )
                is not None
            )
        # Registering again is idempotent.
        assert (
            registry.register_checkpoint(
                session, run_id=run, step=0, path="/x", fingerprint="f", fmt="hf"
            )
            is None
        )


def test_concurrent_claimers_never_share_a_job(pg_url: str) -> None:
    _fill(pg_url, 40)
    engine = make_engine(pg_url)
    barrier = threading.Barrier(4)
    claimed: list[list[int]] = [[] for _ in range(4)]

    def worker(i: int) -> None:
        barrier.wait()
        while True:
            with session_scope(engine) as session:
                job = queue.claim(session, worker_id=f"w{i}", lease_s=60)
            if job is None:
                return
            claimed[i].append(job.checkpoint_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    everything = [c for part in claimed for c in part]
    assert len(everything) == 40 and len(set(everything)) == 40
    assert sum(1 for part in claimed if part) >= 2  # the work really was shared


def _layer(name: str) -> LayerRow:
    return LayerRow(
        name=name, kind="q", block=0, method="ww", fit_status="ok", trusted=True, alpha=3.0
    )


def test_expired_lease_is_requeued_and_finished_once(db_url: str) -> None:
    _fill(db_url, 1)
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        dead = queue.claim(session, worker_id="dead", lease_s=0.2)
    assert dead is not None
    time.sleep(0.4)
    with session_scope(engine) as session:
        assert queue.requeue_stale(session) == 1
    with session_scope(engine) as session:
        alive = queue.claim(session, worker_id="alive", lease_s=60)
    assert alive is not None and alive.job_id == dead.job_id and alive.attempts == 2
    with session_scope(engine) as session:
        # The dead worker comes back: its lease is gone, it may not write.
        assert not results.complete(
            session,
            job_id=dead.job_id,
            worker_id="dead",
            layers=[_layer("a")],
            spectra=[],
            device="cpu",
            elapsed_s=1,
            thresholds=Thresholds(),
        )
    with session_scope(engine) as session:
        assert results.complete(
            session,
            job_id=alive.job_id,
            worker_id="alive",
            layers=[_layer("a"), _layer("b")],
            spectra=[],
            device="cpu",
            elapsed_s=1,
            thresholds=Thresholds(),
        )
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(LayerMetric)) == 2
        assert session.scalar(select(Checkpoint.status)) == "done"
        assert session.scalar(select(Checkpoint.n_trusted)) == 2


def test_failing_job_ends_failed_with_its_error(db_url: str) -> None:
    _fill(db_url, 1)
    engine = make_engine(db_url)
    for attempt in range(3):
        with session_scope(engine) as session:
            job = queue.claim(session, worker_id="w", lease_s=60)
        assert job is not None and job.attempts == attempt + 1
        with session_scope(engine) as session:
            queue.fail(
                session, job_id=job.job_id, worker_id="w", error=f"boom {attempt}", max_attempts=3
            )
    with session_scope(engine) as session:
        assert queue.claim(session, worker_id="w", lease_s=60) is None
        job_row = session.scalars(select(AnalysisJob)).one()
        assert job_row.status == "failed" and job_row.last_error == "boom 2"
        assert session.scalar(select(Checkpoint.status)) == "failed"


def test_heartbeat_extends_only_the_holders_lease(pg_url: str) -> None:
    _fill(pg_url, 1)
    engine = make_engine(pg_url)
    with session_scope(engine) as session:
        job = queue.claim(session, worker_id="w", lease_s=1)
    assert job is not None
    with session_scope(engine) as session:
        assert queue.heartbeat(session, job_id=job.job_id, worker_id="w", lease_s=60)
        assert not queue.heartbeat(session, job_id=job.job_id, worker_id="other", lease_s=60)
    time.sleep(1.2)
    with session_scope(engine) as session:
        assert queue.requeue_stale(session) == 0


def test_job_whose_worker_dies_every_time_ends_failed(db_url: str) -> None:
    _fill(db_url, 1)
    engine = make_engine(db_url)
    for attempt in (1, 2, 3):
        with session_scope(engine) as session:
            job = queue.claim(session, worker_id=f"doomed-{attempt}", lease_s=0.1)
        assert job is not None and job.attempts == attempt
        time.sleep(0.2)  # the worker was SIGKILLed: no heartbeat, no fail()
        with session_scope(engine) as session:
            assert queue.requeue_stale(session, max_attempts=3) == 1
    with session_scope(engine) as session:
        assert queue.claim(session, worker_id="next", lease_s=60) is None
        job_row = session.scalars(select(AnalysisJob)).one()
        checkpoint = session.scalars(select(Checkpoint)).one()
        assert (job_row.status, checkpoint.status) == ("failed", "failed")
        assert checkpoint.error is not None and "given up after 3 attempts" in checkpoint.error
        assert "died" in checkpoint.error and job_row.last_error == checkpoint.error


def test_dead_worker_after_a_failed_attempt_keeps_that_error(db_url: str) -> None:
    _fill(db_url, 1)
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        job = queue.claim(session, worker_id="w", lease_s=60)
    assert job is not None
    with session_scope(engine) as session:
        queue.fail(
            session, job_id=job.job_id, worker_id="w", error="MemoryError: boom", max_attempts=2
        )
    with session_scope(engine) as session:
        assert queue.claim(session, worker_id="doomed", lease_s=0.1) is not None
    time.sleep(0.2)
    with session_scope(engine) as session:
        assert queue.requeue_stale(session, max_attempts=2) == 1
    with session_scope(engine) as session:
        error = session.scalar(select(Checkpoint.error))
    assert error is not None and "given up after 2 attempts" in error and "MemoryError" in error


def test_statuses_outside_the_state_machine_are_refused_by_the_database(db_url: str) -> None:
    _fill(db_url, 1)
    engine = make_engine(db_url)
    for table, good in (("checkpoint", CheckpointStatus), ("analysis_job", JobStatus)):
        for status in good:
            with engine.begin() as conn:
                conn.execute(text(f"UPDATE {table} SET status = :s"), {"s": status.value})
        with pytest.raises(IntegrityError, match="status"), engine.begin() as conn:
            conn.execute(text(f"UPDATE {table} SET status = 'bogus'"))
    with pytest.raises(IntegrityError, match="status"), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO checkpoint (run_id, step, path, fingerprint, format, "
                "status, discovered_at) SELECT run_id, 99, path, fingerprint, format, "
                "'Done', discovered_at FROM checkpoint"
            )
        )


def test_one_state_machine_moves_job_and_checkpoint_together(db_url: str) -> None:
    _fill(db_url, 1)
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        job = queue.claim(session, worker_id="w", lease_s=60)
    assert job is not None
    with session_scope(engine) as session:
        assert results.complete(
            session,
            job_id=job.job_id,
            worker_id="w",
            layers=[_layer("a")],
            spectra=[],
            device="cpu",
            elapsed_s=1,
            thresholds=Thresholds(),
        )
    with session_scope(engine) as session:
        row = session.scalars(select(AnalysisJob)).one()
        checkpoint = session.scalars(select(Checkpoint)).one()
        assert (row.status, checkpoint.status) == ("done", "done")
        with pytest.raises(queue.IllegalTransition, match="cannot claim a done job"):
            queue.move(row, checkpoint, queue.Event.CLAIM)
        assert (row.status, checkpoint.status) == ("done", "done")
        queue.move(row, checkpoint, queue.Event.REQUEUE)
        assert (row.status, checkpoint.status) == ("queued", "pending")
    # Every transition leads to statuses the enums (and the database) know.
    for transition in queue.TRANSITIONS.values():
        assert transition.job in JobStatus and transition.checkpoint in CheckpointStatus


def test_has_work_says_whether_a_claim_could_find_a_job(db_url: str) -> None:
    engine = make_engine(db_url)

    def work() -> bool:
        with engine.connect() as conn:
            return queue.has_work(conn)

    assert not work()  # empty queue
    _fill(db_url, 1)
    assert work()  # queued
    with session_scope(engine) as session:
        job = queue.claim(session, worker_id="w", lease_s=0.3)
    assert job is not None
    assert not work()  # running, lease alive: nothing to claim
    time.sleep(0.5)
    assert work()  # the lease ran out: requeue_stale has something to recover
    with session_scope(engine) as session:
        assert queue.requeue_stale(session) == 1
        again = queue.claim(session, worker_id="w", lease_s=30)
    assert again is not None
    with session_scope(engine) as session:
        assert results.complete(
            session,
            job_id=again.job_id,
            worker_id="w",
            layers=[],
            spectra=[],
            device="cpu",
            elapsed_s=0.0,
            thresholds=Thresholds(),
        )
    assert not work()  # done


def test_known_checkpoints_speak_in_the_status_enums(db_url: str) -> None:
    with session_scope(make_engine(db_url)) as session:
        run = registry.ensure_run(session, name="r", path="/runs/r")
        registry.register_checkpoint(
            session, run_id=run, step=1, path="/runs/r/1", fingerprint="f", fmt="hf"
        )
        known = registry.known_checkpoints(session, run_id=run)[1]
    assert known.status is CheckpointStatus.PENDING
    assert known.job_status is JobStatus.QUEUED
