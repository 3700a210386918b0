"""The KEDA query, run as KEDA runs it (the manifest's text, plain SQL on PostgreSQL), against a
known backlog: its answer is the number of claimable jobs, the one ``/metrics`` reports and the
one the workers act on."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from starlette.testclient import TestClient

from alphawatch.service.api import create_app
from alphawatch.service.db import queue
from alphawatch.service.db.models import AnalysisJob
from alphawatch.service.db.session import make_engine, session_scope, utcnow
from alphawatch.settings import Settings
from tests.deploy.keda import keda_answer
from tests.factories import complete_next, register_run

ROOT = Path(__file__).resolve().parents[2]


def metrics_depth(url: str) -> float:
    with TestClient(create_app(Settings(database_url=url))) as client:
        text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "alphawatch_queue_depth":
            return float(family.samples[0].value)
    raise AssertionError("no alphawatch_queue_depth in /metrics")


def cli_depth(url: str) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "alphawatch", "db", "queue-depth", "--db", url],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return int(done.stdout)


def test_the_keda_query_counts_claimable_jobs(pg_url: str) -> None:
    assert keda_answer(pg_url) == 0
    # 12 checkpoints over two runs: 3 analysed, 1 failed for good, 2 being analysed under a live
    # lease, 1 whose worker died (lease ran out), 5 queued. Claimable: the 5 and the orphan.
    register_run(pg_url, name="a", steps=range(1, 7))
    register_run(pg_url, name="b", steps=range(1, 7), checkpoint_path="/r/b/{step}")
    for _ in range(3):
        complete_next(pg_url, layers=lambda step: [])
    engine = make_engine(pg_url)
    with session_scope(engine) as session:
        failed = queue.claim(session, worker_id="w-failed", lease_s=60)
        assert failed is not None
        queue.fail(session, job_id=failed.job_id, worker_id="w-failed", error="bad", max_attempts=1)
    held = []
    for worker in ("w-live-1", "w-live-2", "w-dead"):
        with session_scope(engine) as session:
            job = queue.claim(session, worker_id=worker, lease_s=600)
            assert job is not None
            held.append(job)
    with session_scope(engine) as session:
        session.execute(
            update(AnalysisJob)
            .where(AnalysisJob.id == held[2].job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=5))
        )
    assert keda_answer(pg_url) == 6
    assert metrics_depth(pg_url) == 6
    assert cli_depth(pg_url) == 6
    with engine.connect() as conn:
        assert queue.has_work(conn)
        assert queue.depth(conn) == 6

    # A live worker gives its job back (told to stop): one more claimable, attempt not counted.
    with session_scope(engine) as session:
        assert queue.release(session, job_id=held[0].job_id, worker_id="w-live-1")
        assert not queue.release(session, job_id=held[0].job_id, worker_id="w-live-1")
    assert keda_answer(pg_url) == 7
    with session_scope(engine) as session:
        job = session.get(AnalysisJob, held[0].job_id)
        assert job is not None and (job.status, job.attempts, job.worker_id) == ("queued", 0, None)

    # Workers take everything: nothing claimable, whatever is still running.
    claimed = 0
    while True:
        with session_scope(engine) as session:
            queue.requeue_stale(session)
            if queue.claim(session, worker_id="w-new", lease_s=600) is None:
                break
            claimed += 1
    assert claimed == 7
    assert keda_answer(pg_url) == 0
    assert metrics_depth(pg_url) == 0
    with engine.connect() as conn:
        assert not queue.has_work(conn)


def test_depth_and_has_work_agree_on_sqlite(sqlite_url: str) -> None:
    register_run(sqlite_url, name="a", steps=range(1, 4))
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        assert (queue.depth(conn), queue.has_work(conn)) == (3, True)
    for _ in range(3):
        with session_scope(engine) as session:
            assert queue.claim(session, worker_id="w", lease_s=600) is not None
    with engine.connect() as conn:
        assert (queue.depth(conn), queue.has_work(conn)) == (0, False)
    with session_scope(engine) as session:
        session.execute(
            update(AnalysisJob).values(lease_expires_at=utcnow() - timedelta(milliseconds=300))
        )
    with engine.connect() as conn:
        assert (queue.depth(conn), queue.has_work(conn)) == (3, True)
    assert metrics_depth(sqlite_url) == 3
