"""Several workers, one discoverer; "scan now" from the training side, end to end.

Real ``alphawatch watch`` processes on a real database: only the holder of the discovery
lease discovers (all of them analyse), a killed holder's lease runs out and another worker
discovers in its place, and a ``POST /api/v1/runs/{id}/scan`` to a live server makes a worker
polling every 120 s analyse a new checkpoint within seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from alphawatch.service.api import create_app
from alphawatch.service.db import registry, scans
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import TokenScope, create_token
from alphawatch.settings import Settings
from tests.db import rows as _rows
from tests.db import wait_until
from tests.live import serve

ROOT = Path(__file__).resolve().parents[2]


def _token(url: str, scope: TokenScope) -> str:
    with session_scope(make_engine(url)) as session:
        return create_token(session, name=f"t-{scope.value}", scope=scope)


def test_scan_endpoint_records_a_request_and_says_when(tmp_path: Path, db_url: str) -> None:
    root = tmp_path / "runs"
    (root / "run").mkdir(parents=True)
    settings = Settings(database_url=db_url, allowed_roots=[root])
    write, read = _token(db_url, TokenScope.WRITE), _token(db_url, TokenScope.READ)
    with TestClient(create_app(settings)) as client:
        created = client.post(
            "/api/v1/runs",
            json={"name": "run", "path": str(root / "run")},
            headers={"Authorization": f"Bearer {write}"},
        )
        run_id = created.json()["id"]
        before = datetime.now(UTC)
        answer = client.post(
            f"/api/v1/runs/{run_id}/scan", headers={"Authorization": f"Bearer {write}"}
        )
        assert answer.status_code == 202, answer.text
        body = answer.json()
        assert set(body) == {"run_id", "requested_at"}
        assert body["run_id"] == run_id
        requested = datetime.fromisoformat(body["requested_at"])
        assert before - timedelta(seconds=1) <= requested <= datetime.now(UTC)

        unknown = client.post(
            "/api/v1/runs/999999/scan", headers={"Authorization": f"Bearer {write}"}
        )
        assert unknown.status_code == 404 and "detail" in unknown.json()
        assert client.post(f"/api/v1/runs/{run_id}/scan").status_code == 401
        assert (
            client.post(
                f"/api/v1/runs/{run_id}/scan", headers={"Authorization": f"Bearer {read}"}
            ).status_code
            == 403
        )

    with session_scope(make_engine(db_url)) as session:
        (request,) = scans.scan_requests(session)
    assert request.run_id == run_id and request.path == str(root / "run")
    # A request made while the scan ran stays for the next one; the one seen is cleared.
    with session_scope(make_engine(db_url)) as session:
        scans.clear_scan_request(
            session,
            request=scans.ScanRequest(
                run_id, request.path, request.requested_at - timedelta(seconds=1)
            ),
        )
    with session_scope(make_engine(db_url)) as session:
        assert len(scans.scan_requests(session)) == 1
        scans.clear_scan_request(session, request=request)
    with session_scope(make_engine(db_url)) as session:
        assert scans.scan_requests(session) == []


def test_the_discovery_lease_has_one_holder_until_it_runs_out(db_url: str) -> None:
    engine = make_engine(db_url)

    def hold(holder: str, ttl_s: float = 30.0) -> bool:
        with session_scope(engine) as session:
            return scans.hold_lease(session, holder=holder, ttl_s=ttl_s)

    assert hold("a", ttl_s=0.5)
    assert not hold("b")
    assert hold("a", ttl_s=0.5)  # renewed by its holder
    time.sleep(0.7)
    assert hold("b")  # run out: taken over
    assert not hold("a")
    with session_scope(engine) as session:
        scans.release_lease(session, holder="b")
    assert hold("a")


def _worker(url: str, root: Path, log: Path, poll: float, **env: str) -> subprocess.Popen[bytes]:
    environ = {
        **os.environ,
        "ALPHAWATCH_ALLOWED_ROOTS": json.dumps([str(root)]),
        "ALPHAWATCH_SETTLE_S": "0",
        "ALPHAWATCH_DEVICE": "cpu",
        "ALPHAWATCH_HEARTBEAT_S": "1",
        **env,
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "alphawatch", "watch", "--db", url, "--poll", str(poll)],
            cwd=ROOT,
            env=environ,
            stdout=out,
            stderr=out,
        )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _done(url: str, steps: int) -> bool:
    return _rows(url, "SELECT count(*) FROM checkpoint WHERE status = 'done'") == [(steps,)]


def test_one_worker_discovers_all_analyse_and_a_dead_holder_is_replaced(
    tiny_run: Path, tmp_path: Path, db_url: str
) -> None:
    root = tmp_path / "runs"
    run = root / "run"
    shutil.copytree(tiny_run, run)
    with session_scope(make_engine(db_url)) as session:
        registry.ensure_run(session, name="run", path=str(run))
    logs = [tmp_path / f"worker-{n}.log" for n in range(2)]
    # A short discovery lease (ALPHAWATCH_LEASE_S) so that a killed holder is replaced soon.
    procs = [_worker(db_url, root, log, 0.3, ALPHAWATCH_LEASE_S="4") for log in logs]
    try:
        wait_until(lambda: _done(db_url, 3), 240, "the run analysed")
        time.sleep(1.5)  # several more passes of both workers
        holders = [n for n, log in enumerate(logs) if "discovers now" in log.read_text()]
        assert len(holders) == 1, [log.read_text()[-2000:] for log in logs]
        (holder,) = holders
        queued = [log.read_text().count("queued run step") for log in logs]
        assert queued[holder] == 3 and queued[1 - holder] == 0
        assert _rows(db_url, "SELECT max(analysis_count) FROM checkpoint") == [(1,)]

        procs[holder].send_signal(signal.SIGKILL)
        procs[holder].wait()
        shutil.copytree(tiny_run / "checkpoint-30", run / "checkpoint-40")
        wait_until(lambda: _done(db_url, 4), 120, "the new checkpoint analysed by the other")
        assert "discovers now" in logs[1 - holder].read_text()
    finally:
        _stop(procs)
    assert procs[1 - holder].returncode == 0


def test_scan_now_from_the_training_side_beats_a_long_poll(
    tiny_run: Path, tmp_path: Path, db_url: str
) -> None:
    root = tmp_path / "runs"
    run = root / "run"
    shutil.copytree(tiny_run, run)
    settings = Settings(database_url=db_url, allowed_roots=[root])
    token = _token(db_url, TokenScope.WRITE)
    auth = {"Authorization": f"Bearer {token}"}
    log = tmp_path / "worker.log"
    with serve(create_app(settings)) as base:
        created = httpx.post(
            f"{base}/api/v1/runs", json={"name": "run", "path": str(run)}, headers=auth
        )
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        proc = _worker(db_url, root, log, 120.0)
        try:
            wait_until(lambda: _done(db_url, 3), 240, "the first pass analysed")
            # Saved by the trainer, then announced by its callback; the next poll is ~2 min off.
            shutil.copytree(tiny_run / "checkpoint-30", run / "checkpoint-40")
            asked = time.monotonic()
            answer = httpx.post(f"{base}/api/v1/runs/{run_id}/scan", headers=auth)
            assert answer.status_code == 202, answer.text
            wait_until(lambda: _done(db_url, 4), 30, "the announced checkpoint analysed")
            took = time.monotonic() - asked
            assert _rows(db_url, "SELECT scan_requested_at FROM run") == [(None,)]
            assert proc.poll() is None, log.read_text()
        finally:
            _stop([proc])
    assert took < 30
    print(f"announced checkpoint analysed {took:.1f}s after POST /scan")
