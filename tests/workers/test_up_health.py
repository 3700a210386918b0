"""`alphawatch up`: a worker loop that keeps failing goes on, and /health says 503 meanwhile."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from tests import pg

ROOT = Path(__file__).resolve().parents[2]


def _health(base: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: dict[str, Any] = json.load(response)
    return body


def _statuses(base: str) -> dict[int, str]:
    try:
        runs = _get(f"{base}/api/v1/runs")["runs"]
        if not runs:
            return {}
        listed = _get(f"{base}/api/v1/runs/{runs[0]['id']}/checkpoints")["checkpoints"]
    except (OSError, ValueError):
        return {}
    return {c["step"]: c["status"] for c in listed}


def _wait(predicate: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.2)


def _sql(url: str, statement: str) -> None:
    with psycopg.connect(pg.libpq_dsn(url), autocommit=True) as conn:
        conn.execute(statement)


def test_up_reports_a_failing_worker_on_health_until_it_recovers(
    tiny_run: Path, tmp_path: Path, pg_url: str
) -> None:
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run / "checkpoint-10", run / "checkpoint-10")
    # `up RUN` allows RUN itself, not its parent: a link to a run beside it is refused.
    sibling = tmp_path / "runs" / "sibling" / "checkpoint-20"
    shutil.copytree(tiny_run / "checkpoint-20", sibling)
    (run / "checkpoint-20").symlink_to(sibling, target_is_directory=True)
    port = pg.free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ALPHAWATCH_SETTLE_S": "0", "ALPHAWATCH_DEVICE": "cpu"}
    env.pop("ALPHAWATCH_ALLOWED_ROOTS", None)
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "alphawatch",
                "up",
                str(run),
                "--db",
                pg_url,
                "--port",
                str(port),
                "--poll",
                "0.2",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        _wait(lambda: _health(base) == (200, {"status": "ok"}), 120, "the server", log)
        _wait(lambda: _statuses(base) == {10: "done", 20: "failed"}, 120, "the analysis", log)
        # A database that answers with errors (not an unreachable one, which is retried):
        # every discovery query fails; the loop records why, backs off and goes on.
        _sql(pg_url, "ALTER TABLE run RENAME TO run_hidden")
        _wait(lambda: _health(base)[0] == 503, 60, "/health to report the failing worker", log)
        code, body = _health(base)
        assert (code, body["status"]) == (503, "degraded")
        assert "run" in body["reason"] and "discovery failing" in body["reason"]
        assert proc.poll() is None

        _sql(pg_url, "ALTER TABLE run_hidden RENAME TO run")
        _wait(
            lambda: _health(base) == (200, {"status": "ok"}),
            90,
            "/health to recover once discovery completes a pass",
            log,
        )
        runs = _get(f"{base}/api/v1/runs")["runs"]
        assert [r["path"] for r in runs] == [str(run.resolve())]
        listed = _get(f"{base}/api/v1/runs/{runs[0]['id']}/checkpoints")["checkpoints"]
        refused = next(c for c in listed if c["step"] == 20)
        assert "outside the allowed roots" in refused["error"]
        assert str(run.resolve()) in refused["error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
