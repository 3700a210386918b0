"""The keep-up policy (ALPHAWATCH_KEEP_UP): a worker behind a backlog analyses the newest step and
the coarse-to-fine backbone, marks the rest skipped (never absent), and brings them back when
the policy is off. Real checkpoints, a real watcher, the real API."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from sqlalchemy import select, text

from alphawatch.service.api import create_app
from alphawatch.service.db import queue, registry
from alphawatch.service.db.models import AnalysisJob, Checkpoint, CheckpointStatus, JobStatus
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.workers.watcher import Watcher
from tests.factories import complete_next, layer_row, register_run
from tests.workers.small import write_checkpoint

BOUND = 8
STEPS = range(100, 4100, 100)  # 40 checkpoints


def _settings(url: str, keep_up: int) -> Settings:
    return Settings(
        database_url=url,
        device="cpu",
        settle_s=0.0,
        poll_interval_s=0.2,
        lease_s=30.0,
        heartbeat_s=0.5,
        keep_up=keep_up,
    )


def _statuses(url: str) -> dict[int, tuple[str, str]]:
    """Step -> (checkpoint status, job status) of every registered checkpoint."""
    with session_scope(make_engine(url)) as session:
        rows = session.execute(
            select(Checkpoint.step, Checkpoint.status, AnalysisJob.status).join(
                AnalysisJob, AnalysisJob.checkpoint_id == Checkpoint.id
            )
        ).all()
    return {int(step): (str(c), str(j)) for step, c, j in rows}


def _claim_order(url: str) -> list[int]:
    with session_scope(make_engine(url)) as session:
        return [
            int(s)
            for s in session.scalars(
                select(Checkpoint.step)
                .where(Checkpoint.started_at.is_not(None))
                .order_by(Checkpoint.started_at)
            )
        ]


def test_a_worker_keeping_up_analyses_the_newest_and_the_backbone_and_skips_the_rest(
    tmp_path: Path, db_url: str
) -> None:
    run = tmp_path / "runs" / "long"
    for step in STEPS:
        write_checkpoint(run, step, seed=step)
    steps = list(STEPS)
    backbone = {steps[i] for i in queue.coarse_to_fine(len(steps))[:BOUND]}
    # The ends, the middle, the quarters: whole levels of the coarse-to-fine order.
    assert {100, 4000, 2000, 1000, 3000} <= backbone
    watcher = Watcher(_settings(db_url, BOUND), [run])
    try:
        assert watcher.discover_once() == len(steps)
        while watcher.process_one():
            pass
    finally:
        watcher.close()

    order = _claim_order(db_url)
    assert order[0] == max(steps)  # the newest first
    assert set(order) == backbone
    statuses = _statuses(db_url)
    assert sorted(statuses) == steps  # nothing absent
    assert {s for s, (c, j) in statuses.items() if c == "done" and j == "done"} == backbone
    skipped = {s for s, (c, j) in statuses.items() if c == "skipped" and j == "skipped"}
    assert skipped == set(steps) - backbone and len(skipped) == len(steps) - BOUND

    with TestClient(create_app(Settings(database_url=db_url))) as client:
        (listed,) = client.get("/api/v1/runs").json()["runs"]
        run_id = listed["id"]
        assert (listed["n_checkpoints"], listed["n_done"], listed["n_skipped"]) == (40, 8, 32)
        # Skipped is not backlog: nothing waits, and the lag says so.
        assert listed["n_pending"] == 0 and listed["lag_checkpoints"] == 0
        assert listed["lag_oldest_seconds"] is None
        shown = client.get(f"/api/v1/runs/{run_id}/checkpoints").json()["checkpoints"]
        assert {c["step"]: c["status"] for c in shown} == {s: c for s, (c, _) in statuses.items()}
        for c in shown:
            if c["status"] == "skipped":
                assert "keep up" in c["error"] and "ALPHAWATCH_KEEP_UP=8" in c["error"]
                assert c["started_at"] is None and c["n_layers"] is None
        # The gate does not wait for a skipped step: the run moved past it without one.
        step = min(skipped)
        verdict = client.get(f"/api/v1/runs/{run_id}/gate?step={step}&wait_s=30").json()
        assert verdict["pending"] is False and verdict["passed"] is False
        assert "skipped by the keep-up policy" in verdict["violations"][0]["message"]
        # Exports hold the analysed steps only, and every one of them.
        lines = client.get(f"/api/v1/runs/{run_id}/layers.csv").text.splitlines()
        assert {int(line.split(",")[0]) for line in lines[1:]} == backbone
        trend = client.get(f"/api/v1/runs/{run_id}/trend").json()["points"]
        assert [p["step"] for p in trend] == sorted(backbone)
        metrics = client.get("/metrics").text
        assert 'alphawatch_checkpoints{status="skipped"} 32.0' in metrics
        assert "alphawatch_queue_depth 0.0" in metrics

    # A new checkpoint is analysed next, however many were skipped before it.
    write_checkpoint(run, 4100, seed=4100)
    watcher = Watcher(_settings(db_url, BOUND), [run])
    try:
        assert watcher.discover_once() == 1
        assert watcher.process_one()
        assert not watcher.process_one()
    finally:
        watcher.close()
    assert _claim_order(db_url)[-1] == 4100
    assert _statuses(db_url)[4100] == ("done", "done")

    # Turned off, the policy's skipped steps are queued again, in the claim order.
    watcher = Watcher(_settings(db_url, 0), [run])
    try:
        watcher.discover_once()
        statuses = _statuses(db_url)
        assert not [s for s, (c, _) in statuses.items() if c == "skipped"]
        assert {s for s, (c, j) in statuses.items() if (c, j) == ("pending", "queued")} == skipped
        assert watcher.process_one()
    finally:
        watcher.close()
    with session_scope(make_engine(db_url)) as session:
        errors = session.scalars(select(Checkpoint.error).where(Checkpoint.step.in_(skipped))).all()
    assert errors == [None] * len(skipped)
    # In the claim order of all 41 steps: the skipped step that is now the run's middle.
    everything = [*steps, 4100]
    first = next(
        everything[i] for i in queue.coarse_to_fine(len(everything)) if everything[i] in skipped
    )
    assert _claim_order(db_url)[-1] == first == 2100


def test_with_the_policy_off_nothing_is_skipped(tmp_path: Path, db_url: str) -> None:
    run = tmp_path / "runs" / "long"
    for step in STEPS:
        write_checkpoint(run, step, seed=step)
    watcher = Watcher(_settings(db_url, 0), [run])
    try:
        assert watcher.discover_once() == len(STEPS)
        for _ in range(2):
            assert watcher.process_one()
    finally:
        watcher.close()
    statuses = _statuses(db_url)
    assert len(statuses) == len(STEPS)
    assert sorted(c for c, _ in statuses.values()).count("pending") == len(STEPS) - 2
    assert not [s for s, (c, j) in statuses.items() if "skipped" in (c, j)]


def _register(url: str, run_id: int, steps: range) -> None:
    with session_scope(make_engine(url)) as session:
        for step in steps:
            registry.register_checkpoint(
                session, run_id=run_id, step=step, path=f"/r/{step}", fingerprint="f", fmt="hf"
            )
        queue.reorder(session, run_id=run_id)
        queue.keep_up(session, run_id=run_id, bound=3)


def test_the_bound_holds_as_steps_arrive_and_the_newest_is_always_kept(db_url: str) -> None:
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        run_id = registry.ensure_run(session, name="r", path="/r")
    _register(db_url, run_id, range(10))
    with session_scope(engine) as session:
        job = queue.claim(session, worker_id="w", lease_s=60)
    assert job is not None and job.step == 9
    statuses = _statuses(db_url)
    assert {s for s, (_, j) in statuses.items() if j == "queued"} == {0, 4}
    assert len([s for s, (_, j) in statuses.items() if j == "skipped"]) == 7
    # Five more while step 9 is analysed: the running job is left alone, the bound holds,
    # and the newest is one of the three queued.
    _register(db_url, run_id, range(10, 15))
    statuses = _statuses(db_url)
    queued = {s for s, (_, j) in statuses.items() if j == "queued"}
    assert len(queued) == 3 and 14 in queued
    assert statuses[9] == ("running", "running")
    assert len(statuses) == 15
    # A skipped job cannot be claimed; the state machine refuses to skip what is not queued.
    with session_scope(engine) as session:
        running = session.scalars(
            select(AnalysisJob).where(AnalysisJob.status == JobStatus.RUNNING.value)
        ).one()
        with pytest.raises(queue.IllegalTransition):
            queue.move(running, None, queue.Event.SKIP)
        session.rollback()
    claimed = []
    while True:
        with session_scope(engine) as session:
            job = queue.claim(session, worker_id="w", lease_s=60)
        if job is None:
            break
        claimed.append(job.step)
    assert set(claimed) == queued


def test_a_job_being_claimed_is_never_skipped(pg_url: str) -> None:
    engine = make_engine(pg_url)
    with session_scope(engine) as session:
        run_id = registry.ensure_run(session, name="r", path="/r")
        for step in range(10):
            registry.register_checkpoint(
                session, run_id=run_id, step=step, path=f"/r/{step}", fingerprint="f", fmt="hf"
            )
        queue.reorder(session, run_id=run_id)
        # The job the policy would skip first, as a claimer holds it in its transaction.
        last = session.scalar(select(AnalysisJob.id).order_by(AnalysisJob.priority.desc()).limit(1))
    held = threading.Event()
    release = threading.Event()

    def claimer() -> None:
        with engine.begin() as conn:
            conn.execute(
                text("SELECT id FROM analysis_job WHERE id = :id FOR UPDATE"), {"id": last}
            )
            held.set()
            release.wait(30)
            conn.execute(
                text("UPDATE analysis_job SET status = 'running' WHERE id = :id"), {"id": last}
            )

    thread = threading.Thread(target=claimer)
    thread.start()
    try:
        assert held.wait(10)
        with session_scope(engine) as session:
            assert queue.keep_up(session, run_id=run_id, bound=3) == 6
    finally:
        release.set()
        thread.join(30)
    with session_scope(engine) as session:
        assert session.scalar(select(AnalysisJob.status).where(AnalysisJob.id == last)) == (
            JobStatus.RUNNING.value
        )
        counts = dict(
            session.execute(
                select(Checkpoint.status, text("count(*)")).group_by(Checkpoint.status)
            ).all()
        )
    assert counts == {CheckpointStatus.PENDING.value: 4, CheckpointStatus.SKIPPED.value: 6}


def test_reanalysis_requeues_a_skipped_checkpoint(db_url: str) -> None:
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        run_id = registry.ensure_run(session, name="r", path="/r")
    _register(db_url, run_id, range(6))
    skipped = {s for s, (c, _) in _statuses(db_url).items() if c == "skipped"}
    assert len(skipped) == 3
    step = min(skipped)
    with session_scope(engine) as session:
        assert queue.reanalyze(session, run_id=run_id, step=step) == 1
    assert _statuses(db_url)[step] == ("pending", "queued")
    with session_scope(engine) as session:
        assert session.scalar(select(Checkpoint.error).where(Checkpoint.step == step)) is None


def test_a_skipped_checkpoint_rewritten_on_disk_stays_skipped(tmp_path: Path, db_url: str) -> None:
    run = tmp_path / "runs" / "r"
    for step in range(100, 600, 100):
        write_checkpoint(run, step, seed=step)
    watcher = Watcher(_settings(db_url, 3), [run])
    try:
        assert watcher.discover_once() == 5
    finally:
        watcher.close()
    skipped = sorted(s for s, (c, _) in _statuses(db_url).items() if c == "skipped")
    assert len(skipped) == 2
    with session_scope(make_engine(db_url)) as session:
        before = session.scalar(select(Checkpoint.fingerprint).where(Checkpoint.step == skipped[0]))
    folder = run / f"checkpoint-{skipped[0]}"
    save_file({"w.weight": torch.ones(80, 40)}, str(folder / "model.safetensors"))
    watcher = Watcher(_settings(db_url, 3), [run])
    try:
        assert watcher.discover_once() == 0
    finally:
        watcher.close()
    with session_scope(make_engine(db_url)) as session:
        fingerprint, rewritten = session.execute(
            select(Checkpoint.fingerprint, Checkpoint.rewritten_at).where(
                Checkpoint.step == skipped[0]
            )
        ).one()
    # Not queued as a rewrite: it reads the new files whenever it is analysed.
    assert fingerprint != before and rewritten is None
    assert _statuses(db_url)[skipped[0]] == ("skipped", "skipped")


def test_an_analysed_checkpoint_queued_again_is_never_skipped(db_url: str) -> None:
    engine = make_engine(db_url)
    run_id = register_run(db_url, name="r", steps=range(6))
    for _ in range(6):
        complete_next(db_url, layers=lambda _step: [layer_row()])
    with session_scope(engine) as session:
        assert queue.reanalyze(session, run_id=run_id) == 6
        queue.reorder(session, run_id=run_id)
        # Re-analyses are asked for: skipping one would hide the results it has.
        assert queue.keep_up(session, run_id=run_id, bound=3) == 0
    _register(db_url, run_id, range(6, 12))
    statuses = _statuses(db_url)
    # New steps beyond the bound are skipped, the newest kept; the re-analyses stay queued.
    assert {s for s, (c, _) in statuses.items() if c == "skipped"} == set(range(6, 11))
    assert {s for s, (c, _) in statuses.items() if c == "pending"} == {*range(6), 11}
