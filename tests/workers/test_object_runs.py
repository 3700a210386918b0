"""A worker watching runs in a bucket: registration, analysis, request cost, credentials.

Against a real S3 API on 127.0.0.1 (moto's server mode) through s3fs, and a real PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path

import pytest

pytest.importorskip("moto")
pytest.importorskip("s3fs")

from fastapi.testclient import TestClient

from alphawatch.cli import analyze_path
from alphawatch.service.api import create_app
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import create_token
from alphawatch.workers.watcher import Watcher
from tests.db import rows as _rows
from tests.factories import worker_settings
from tests.objectstore import (
    SECRET,
    CountingServer,
    client_fs,
    upload,
)
from tests.workers.small import write_checkpoint


def _all_text(url: str) -> str:
    """Every text column a run leaves in the database, as one string."""
    found = []
    for sql in (
        "SELECT name, path, coalesce(discovery_error, '') FROM run",
        "SELECT path, coalesce(discovery_error, ''), coalesce(error, '') FROM checkpoint",
        "SELECT coalesce(last_error, '') FROM analysis_job",
        "SELECT coalesce(error, '') FROM layer_metric",
    ):
        found += [" ".join(map(str, row)) for row in _rows(url, sql)]
    return "\n".join(found)


def test_a_worker_analyses_a_run_registered_by_url_and_never_shows_the_secret(
    s3: CountingServer, bucket: str, tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    run = tmp_path / "run"
    for step, seed in ((10, 1), (20, 2), (30, 3)):
        write_checkpoint(run, step, seed=seed)
    upload(client_fs(s3), run, f"s3://{bucket}/team/run-a")
    settings = worker_settings(pg_url, allowed_roots=[f"s3://{bucket}/team"])
    with session_scope(make_engine(pg_url)) as session:
        token = create_token(session, name="ci")
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(settings)) as client:
        body = {"name": "run-a", "path": f"s3://{bucket}/team/run-a"}
        created = client.post("/api/v1/runs", json=body, headers=auth)
        assert created.status_code == 201, created.text
        # Outside the URL roots, or not in normal form: refused, nothing registered.
        outside = {"name": "b", "path": f"s3://{bucket}/other/run"}
        assert client.post("/api/v1/runs", json=outside, headers=auth).status_code == 403
        sneaky = {"name": "c", "path": f"s3://{bucket}/team/../other/run"}
        assert client.post("/api/v1/runs", json=sneaky, headers=auth).status_code in (400, 422)

    watcher = Watcher(settings, [])
    assert watcher.run_once() == 3
    assert sorted(_rows(pg_url, "SELECT step, path, status FROM checkpoint")) == [
        (step, f"s3://{bucket}/team/run-a/checkpoint-{step}", "done") for step in (10, 20, 30)
    ]
    with TestClient(create_app(settings)) as client:
        runs = client.get("/api/v1/runs").json()["runs"]
        assert [(r["name"], r["path"]) for r in runs] == [("run-a", f"s3://{bucket}/team/run-a")]
        served = client.get(f"/api/v1/runs/{runs[0]['id']}/checkpoints/30/layers").json()
        answers = [client.get(f"/api/v1/runs/{runs[0]['id']}").text, str(served)]
    # The numbers are those of the same files read from disk.
    direct = analyze_path(run / "checkpoint-30", settings)
    ours = {layer["name"]: layer for layer in served["layers"]}
    assert set(ours) == {layer["name"] for layer in direct["layers"]}
    for layer in direct["layers"]:
        assert math.isclose(ours[layer["name"]]["alpha"], layer["alpha"], rel_tol=1e-12)
    # The secret came from the environment only: not in any log line, row or answer.
    assert SECRET not in caplog.text
    assert SECRET not in _all_text(pg_url)
    assert all(SECRET not in answer for answer in answers)


def test_an_idle_poll_costs_one_list_per_run_and_a_new_checkpoint_is_seen(
    s3: CountingServer, bucket: str, tmp_path: Path, pg_url: str
) -> None:
    runs, checkpoints = 4, 12
    fs = client_fs(s3)
    for r in range(runs):
        run = tmp_path / f"run-{r}"
        for c in range(1, checkpoints + 1):
            write_checkpoint(run, c * 10, seed=c)
        upload(fs, run, f"s3://{bucket}/runs/run-{r}")
    urls = [f"s3://{bucket}/runs/run-{r}" for r in range(runs)]
    watcher = Watcher(worker_settings(pg_url), urls)
    s3.reset()
    assert watcher.discover_once() == runs * checkpoints
    first = s3.snapshot()
    # A first pass: one LIST per run, and reads of the markers and headers (ranged GETs).
    assert first["LIST"] == runs and first.get("HEAD", 0) == 0

    for _ in range(3):
        s3.reset()
        assert watcher.discover_once() == 0
        # Settled: nothing but the listing of each run's prefix.
        assert s3.snapshot() == {"LIST": runs}

    write_checkpoint(tmp_path / "new", 999, seed=9)
    upload(fs, tmp_path / "new", urls[1])
    s3.reset()
    assert watcher.discover_once() == 1  # noticed within the next poll
    after = s3.snapshot()
    assert after["LIST"] == runs and after.get("GET", 0) <= 4, after
    assert _rows(pg_url, "SELECT path FROM checkpoint WHERE step = 999") == [
        (f"{urls[1]}/checkpoint-999",)
    ]


def test_a_prefix_that_cannot_be_listed_is_recorded_on_the_run(
    s3: CountingServer, tmp_path: Path, pg_url: str
) -> None:
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    watcher = Watcher(worker_settings(pg_url), [url])
    assert watcher.discover_once() == 0
    [(path, error)] = _rows(pg_url, "SELECT path, discovery_error FROM run")
    assert path == url
    assert error and url in error and SECRET not in error


def test_two_workers_share_the_checkpoints_of_a_run_in_a_bucket(
    s3: CountingServer, bucket: str, tmp_path: Path, pg_url: str
) -> None:
    run = tmp_path / "run"
    for step, seed in ((10, 1), (20, 2), (30, 3), (40, 4)):
        write_checkpoint(run, step, seed=seed)
    url = f"s3://{bucket}/run"
    upload(client_fs(s3), run, url)
    settings = worker_settings(pg_url)
    first, second = Watcher(settings, [url]), Watcher(settings, [url])
    try:
        assert first.discover_once() == 4
        assert second.discover_once() == 0  # registered once, whoever looks
        busy = True
        while busy:
            took = [first.process_one(), second.process_one()]
            busy = any(took)
    finally:
        first.close()
        second.close()
    jobs = _rows(pg_url, "SELECT status, worker_id FROM analysis_job")
    assert [status for status, _ in jobs] == ["done"] * 4
    assert {worker for _, worker in jobs} == {first.worker_id, second.worker_id}
    assert _rows(pg_url, "SELECT count(*) FROM layer_metric") == [(4 * 3,)]


def test_a_settled_fleet_costs_one_list_per_run_per_worker_poll(
    s3: CountingServer, bucket: str, tmp_path: Path, pg_url: str
) -> None:
    """Every checkpoint analysed: a poll of the whole worker (discovery, then the queue) asks
    the store for one listing per run and nothing else, poll after poll."""
    runs, checkpoints = 3, 4
    fs = client_fs(s3)
    urls = [f"s3://{bucket}/fleet/run-{r}" for r in range(runs)]
    for r, url in enumerate(urls):
        for c in range(1, checkpoints + 1):
            write_checkpoint(tmp_path / f"run-{r}", c * 10, seed=10 * r + c)
        upload(fs, tmp_path / f"run-{r}", url)
    watcher = Watcher(worker_settings(pg_url), urls)
    try:
        assert watcher.run_once() == runs * checkpoints  # registered and analysed
        assert _rows(pg_url, "SELECT DISTINCT status FROM checkpoint") == [("done",)]
        for _ in range(3):
            s3.reset()
            assert watcher.run_once() == 0
            assert s3.snapshot() == {"LIST": runs}
    finally:
        watcher.close()


def test_a_restarted_worker_lists_its_runs_and_reads_only_what_changed(
    s3: CountingServer, bucket: str, tmp_path: Path, pg_url: str
) -> None:
    """A worker started afresh on the same database takes every checkpoint registered with
    the files its listing shows as settled, analysed or still queued: its first pass is one
    LIST per run and not one GET. A checkpoint rewritten while no worker ran is read and
    queued again, a new one registered."""
    runs, checkpoints = 2, 3
    fs = client_fs(s3)
    urls = [f"s3://{bucket}/restart/run-{r}" for r in range(runs)]
    for r, url in enumerate(urls):
        for c in range(1, checkpoints + 1):
            write_checkpoint(tmp_path / f"run-{r}", c * 10, seed=10 * r + c)
        upload(fs, tmp_path / f"run-{r}", url)
    settings = worker_settings(pg_url)
    first = Watcher(settings, urls)
    try:
        assert first.discover_once() == runs * checkpoints
        assert first.process_one() and first.process_one()  # two analysed, the others queued
    finally:
        first.close()
    statuses = "SELECT status, count(*) FROM checkpoint GROUP BY status ORDER BY status"
    assert _rows(pg_url, statuses) == [("done", 2), ("pending", 4)]

    restarted = Watcher(settings, urls)
    try:
        for _ in range(2):  # its first pass, then an idle one
            s3.reset()
            assert restarted.discover_once() == 0
            assert s3.snapshot() == {"LIST": runs}
    finally:
        restarted.close()

    # While no worker runs: an analysed checkpoint's marker is rewritten (another size), and a
    # new checkpoint is written.
    ((rewritten,),) = _rows(pg_url, "SELECT path FROM checkpoint WHERE status = 'done' LIMIT 1")
    step = int(rewritten.rpartition("-")[2])
    fs.pipe_file(
        f"{rewritten.removeprefix('s3://')}/trainer_state.json",
        json.dumps({"global_step": step, "epoch": 1.0, "log_history": []}).encode(),
    )
    write_checkpoint(tmp_path / "new", 40, seed=99)
    upload(fs, tmp_path / "new", urls[1])
    again = Watcher(settings, urls)
    try:
        s3.reset()
        assert again.discover_once() == 2  # one queued again, one new
        requests = s3.snapshot()
    finally:
        again.close()
    # Only those two are read: each its marker and its weights' header.
    assert requests["LIST"] == runs and requests.get("HEAD", 0) == 0
    assert 0 < requests["GET"] <= 2 * 3, requests
    assert _rows(
        pg_url,
        "SELECT c.status, j.status, c.rewritten_at IS NOT NULL FROM checkpoint c "
        f"JOIN analysis_job j ON j.checkpoint_id = c.id WHERE c.path = '{rewritten}'",
    ) == [("pending", "queued", True)]
    assert _rows(pg_url, statuses) == [("done", 1), ("pending", 6)]
