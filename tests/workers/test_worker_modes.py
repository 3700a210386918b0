"""Worker modes a scheduler drives: ``--max-jobs``, ``--exit-when-idle``, ``--discover-only``,
``--health-port``, and SIGTERM (finish the job in hand within the grace period, or give it back).

Real ``alphawatch watch`` processes on a real PostgreSQL database, over checkpoint files these
tests write.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.db import rows, wait_until
from tests.workers import hostile
from tests.workers.small import write_busy_checkpoint, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _start(url: str, log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    values = {
        "ALPHAWATCH_SETTLE_S": "0",
        "ALPHAWATCH_DEVICE": "cpu",
        "ALPHAWATCH_HEARTBEAT_S": "0.5",
        **env,
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "alphawatch", "watch", *args, "--db", url, "--poll", "0.2"],
            cwd=ROOT,
            env={**os.environ, **values},
            stdout=out,
            stderr=out,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _statuses(url: str) -> dict[int, str]:
    return {int(s): str(c) for s, c in rows(url, "SELECT step, status FROM checkpoint")}


@pytest.mark.slow
def test_max_jobs_then_exit_when_idle(tmp_path: Path, pg_url: str) -> None:
    run = tmp_path / "runs" / "r"
    for step in (1, 2, 3):
        write_checkpoint(run, step, seed=step)
    log = tmp_path / "worker.log"
    port = _free_port()
    proc = _start(pg_url, log, str(run), "--max-jobs", "2", "--health-port", str(port))
    try:
        wait_until(lambda: proc.poll() is not None or _health(port) is not None, 60, "/health")
        assert _health(port) == (200, {"status": "ok"})
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    statuses = _statuses(pg_url)
    assert sorted(statuses.values()) == ["done", "done", "pending"], statuses
    assert "processed 2 jobs: exiting" in log.read_text()

    # The next worker takes the one left, then finds nothing for 1 s and exits.
    started = time.monotonic()
    proc = _start(pg_url, log, str(run), "--exit-when-idle", "1")
    assert proc.wait(timeout=90) == 0
    assert set(_statuses(pg_url).values()) == {"done"}
    assert "nothing to claim for" in log.read_text()
    assert time.monotonic() - started < 60
    attempts = rows(pg_url, "SELECT attempts FROM analysis_job")
    assert sorted(a for (a,) in attempts) == [1, 1, 1]


def _health(port: int) -> tuple[int, dict[str, str]] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return answer.status, json.loads(answer.read())
    except OSError:
        return None


@pytest.mark.slow
def test_discover_only_queues_and_analyses_nothing(tmp_path: Path, pg_url: str) -> None:
    run = tmp_path / "runs" / "r"
    for step in (1, 2):
        write_checkpoint(run, step, seed=step)
    proc = _start(pg_url, tmp_path / "d.log", str(run), "--discover-only")
    try:
        wait_until(lambda: len(_statuses(pg_url)) == 2, 60, "discovery")
        time.sleep(1.5)  # several polls: still nothing claimed
        assert set(_statuses(pg_url).values()) == {"pending"}
        # No analysis process: discovery needs neither torch nor a GPU.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rows(pg_url, "SELECT count(*) FROM analysis_job WHERE status = 'queued'") == [(2,)]


def _running(url: str) -> list[tuple[int, str | None]]:
    return [
        (int(a), w)
        for a, w in rows(
            url, "SELECT attempts, worker_id FROM analysis_job WHERE status = 'running'"
        )
    ]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["grace ran out", "second signal"])
def test_sigterm_gives_the_job_in_hand_back(tmp_path: Path, pg_url: str, how: str) -> None:
    run = tmp_path / "runs" / "slow"
    hostile.time_bomb(run, 1)  # minutes of unpickling: still in hand when the signal comes
    log = tmp_path / "worker.log"
    grace = "1" if how == "grace ran out" else "600"
    proc = _start(
        pg_url, log, str(run), ALPHAWATCH_STOP_GRACE_S=grace, ALPHAWATCH_JOB_TIMEOUT_S="600"
    )
    try:
        wait_until(lambda: _running(pg_url) != [], 90, "the job to be claimed")
        ((attempts, worker),) = _running(pg_url)
        assert attempts == 1 and worker is not None and f":{proc.pid}:" in worker
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        if how == "second signal":
            time.sleep(0.5)
            assert proc.poll() is None  # still finishing, within its 600 s
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
    # Given back at once, not left for its lease to run out, and the attempt not counted.
    assert rows(
        pg_url, "SELECT status, attempts, worker_id, lease_expires_at FROM analysis_job"
    ) == [("queued", 0, None, None)]
    assert _statuses(pg_url) == {1: "pending"}
    assert "given back to the queue" in log.read_text()
    assert took < 20


@pytest.mark.slow
def test_sigterm_lets_the_job_in_hand_finish_within_the_grace(tmp_path: Path, pg_url: str) -> None:
    run = tmp_path / "runs" / "r"
    write_busy_checkpoint(run, 1, seed=1, matrices=20)
    log = tmp_path / "worker.log"
    proc = _start(pg_url, log, str(run), ALPHAWATCH_STOP_GRACE_S="600")
    try:
        wait_until(lambda: _running(pg_url) != [], 90, "the job to be claimed")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rows(pg_url, "SELECT status, attempts FROM analysis_job") == [("done", 1)]
    text = log.read_text()
    assert "given back" not in text
    # The signal came while the checkpoint was being analysed, and the analysis went on.
    assert text.index("finishing the job in hand") < text.index(" layers in ")
