"""The present first: a worker behind a backlog claims each run's newest step, serves the runs
in turn, and fills in the rest of a run coarse to fine. Real checkpoints, a real watcher."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import select

from alphawatch.service.db import queue, registry
from alphawatch.service.db.models import Checkpoint, Run
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.workers.watcher import Watcher
from tests.workers.small import write_checkpoint


def _settings(url: str) -> Settings:
    return Settings(
        database_url=url,
        device="cpu",
        settle_s=0.0,
        poll_interval_s=0.2,
        lease_s=30.0,
        heartbeat_s=0.5,
    )


def _run(root: Path, name: str, steps: range) -> Path:
    run = root / name
    for step in steps:
        write_checkpoint(run, step, seed=step)
    return run


def _claimed(url: str) -> list[tuple[str, int]]:
    """(run, step) of every checkpoint a worker has claimed, in the order of the claims."""
    with session_scope(make_engine(url)) as session:
        rows = session.execute(
            select(Run.name, Checkpoint.step)
            .join(Run)
            .where(Checkpoint.started_at.is_not(None))
            .order_by(Checkpoint.started_at)
        ).all()
    return [(str(name), int(step)) for name, step in rows]


def test_a_new_checkpoint_is_not_queued_behind_another_runs_backlog(
    tmp_path: Path, pg_url: str
) -> None:
    backlog = _run(tmp_path / "runs", "backlog", range(100, 1300, 100))  # 12 steps
    live = _run(tmp_path / "runs", "live", range(10, 20, 10))
    watcher = Watcher(_settings(pg_url), [backlog, live])
    try:
        assert watcher.discover_once() == 13
        for _ in range(3):
            assert watcher.process_one()
        # The newest step of each run first, in turn; then the backlog run's first step.
        assert _claimed(pg_url) == [("backlog", 1200), ("live", 10), ("backlog", 100)]
        write_checkpoint(live, 20, seed=20)
        assert watcher.discover_once() == 1
        for _ in range(2):
            assert watcher.process_one()
    finally:
        watcher.close()
    assert ("live", 20) in _claimed(pg_url)[3:5]


def test_a_backlog_is_claimed_newest_then_coarse_to_fine(tmp_path: Path, db_url: str) -> None:
    run = _run(tmp_path / "runs", "r", range(100, 1000, 100))  # 9 steps
    watcher = Watcher(_settings(db_url), [run])
    try:
        assert watcher.discover_once() == 9
    finally:
        watcher.close()
    engine = make_engine(db_url)
    order = []
    while True:
        with session_scope(engine) as session:
            job = queue.claim(session, worker_id="w", lease_s=60)
        if job is None:
            break
        order.append(job.step)
    # The newest, the first, the middle, the quarters, then the eighths.
    assert order == [900, 100, 500, 300, 700, 200, 400, 600, 800]


def test_a_step_added_later_jumps_its_runs_backlog(tmp_path: Path, db_url: str) -> None:
    run = _run(tmp_path / "runs", "r", range(100, 600, 100))
    watcher = Watcher(_settings(db_url), [run])
    engine = make_engine(db_url)
    try:
        assert watcher.discover_once() == 5
        with session_scope(engine) as session:
            first = queue.claim(session, worker_id="w", lease_s=60)
        assert first is not None and first.step == 500
        write_checkpoint(run, 600, seed=600)
        assert watcher.discover_once() == 1
    finally:
        watcher.close()
    with session_scope(engine) as session:
        job = queue.claim(session, worker_id="w", lease_s=60)
    assert job is not None and job.step == 600


def test_concurrent_claimers_in_claim_order_never_share_a_job(pg_url: str) -> None:
    engine = make_engine(pg_url)
    with session_scope(engine) as session:
        for name in ("a", "b", "c"):
            run_id = registry.ensure_run(session, name=name, path=f"/runs/{name}")
            for step in range(15):
                registry.register_checkpoint(
                    session,
                    run_id=run_id,
                    step=step,
                    path=f"/runs/{name}/{step}",
                    fingerprint="f",
                    fmt="hf",
                )
            queue.reorder(session, run_id=run_id)
    barrier = threading.Barrier(4)
    claimed: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            while True:
                with session_scope(engine) as session:
                    job = queue.claim(session, worker_id=f"w{i}", lease_s=60)
                if job is None:
                    return
                claimed[i].append(job.checkpoint_id)
        except BaseException as exc:  # a deadlock or a lost claim ends the thread: reported
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    everything = [c for part in claimed for c in part]
    assert len(everything) == 45 and len(set(everything)) == 45
    assert sum(1 for part in claimed if part) >= 2
