"""Chaos: a real worker analyses dozens of checkpoints while its connections are killed.

One ``alphawatch watch`` process works through a few dozen small real checkpoints on
PostgreSQL while a chaos thread terminates every backend of that worker
(``pg_terminate_backend``) at seeded random moments: in the middle of discovery, of a claim,
a heartbeat, a result write, or between them. Whatever statement a kill lands on, the unit of
work it cut is retried whole, so at the end every checkpoint is ``done`` exactly once, with one
set of layer rows, on its first attempt, and the worker is alive and stops when told.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests import pg
from tests.db import rows, wait_until
from tests.workers.small import MATRICES, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RUNS, STEPS = 3, 10  # 30 checkpoints
SEED = 20261207
# Bounds of the chaos: it ends at whichever comes first, or once everything is analysed.
MAX_ROUNDS, MAX_SECONDS = 120, 40.0
# The worker's connections carry this name (libpq's PGAPPNAME), so that the chaos kills
# the worker's backends and never the test's own reads.
APP = "alphawatch-chaos-worker"
# Every backend of the worker in this test's database (never another database's), but the
# chaos thread's own.
KILL = """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
           WHERE datname = current_database() AND pid <> pg_backend_pid()
             AND application_name = %s"""


class Chaos(threading.Thread):
    """Kills the worker's backends at seeded random intervals until stopped or out of bounds."""

    def __init__(self, url: str, seed: int) -> None:
        super().__init__(name="chaos", daemon=True)
        self.url = url
        self.random = random.Random(seed)
        self.stop_event = threading.Event()
        self.rounds = 0
        self.killed = 0  # backends terminated, over every round

    def run(self) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        with psycopg.connect(pg.libpq_dsn(self.url), autocommit=True) as conn:
            while self.rounds < MAX_ROUNDS and time.monotonic() < deadline:
                if self.stop_event.wait(self.random.uniform(0.02, 0.4)):
                    return
                row = conn.execute(KILL, (APP,)).fetchone()
                self.rounds += 1
                self.killed += int(row[0]) if row else 0


@pytest.mark.slow
def test_every_checkpoint_is_analysed_exactly_once_while_connections_are_killed(
    tmp_path: Path, pg_url: str
) -> None:
    root = tmp_path / "runs"
    runs = [root / f"run-{r}" for r in range(RUNS)]
    for r, run in enumerate(runs):
        for step in range(1, STEPS + 1):
            write_checkpoint(run, step, seed=100 * r + step)
    total = RUNS * STEPS
    env = {
        **os.environ,
        "ALPHAWATCH_SETTLE_S": "0",
        "ALPHAWATCH_DEVICE": "cpu",
        "ALPHAWATCH_LEASE_S": "30",
        "ALPHAWATCH_HEARTBEAT_S": "0.3",
        "ALPHAWATCH_MAX_ATTEMPTS": "3",
        "PGAPPNAME": APP,
    }
    log = tmp_path / "worker.log"
    chaos = Chaos(pg_url, SEED)

    def done() -> int:
        return int(rows(pg_url, "SELECT count(*) FROM checkpoint WHERE status = 'done'")[0][0])

    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "alphawatch",
                "watch",
                *map(str, runs),
                "--db",
                pg_url,
                "--poll",
                "0.2",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        # The chaos starts once the worker is at work, and lasts while it works.
        wait_until(
            lambda: rows(pg_url, "SELECT count(*) FROM checkpoint")[0][0] > 0,
            90,
            "the worker to register checkpoints",
        )
        chaos.start()
        wait_until(lambda: done() == total or not chaos.is_alive(), 120, "the analysis under chaos")
        chaos.stop_event.set()
        chaos.join(timeout=30)
        wait_until(lambda: done() == total, 120, f"all {total} checkpoints done after the chaos")
        assert chaos.killed > 0, "the chaos killed no connection: it tested nothing"
        assert proc.poll() is None, f"the worker died:\n{log.read_text()}"

        assert rows(pg_url, "SELECT count(*) FROM checkpoint") == [(total,)]
        # Exactly once: one completed analysis, on the first attempt, one set of rows each.
        assert rows(
            pg_url,
            """
            SELECT c.status, j.status, c.analysis_count, j.attempts, count(DISTINCT c.id)
              FROM checkpoint c JOIN analysis_job j ON j.checkpoint_id = c.id
             GROUP BY 1, 2, 3, 4""",
        ) == [("done", "done", 1, 1, total)]
        assert rows(
            pg_url,
            """
            SELECT count(*), count(DISTINCT (checkpoint_id, name, method))
              FROM layer_metric""",
        ) == [(total * len(MATRICES), total * len(MATRICES))]
        assert rows(
            pg_url,
            """
            SELECT count(DISTINCT checkpoint_id) FROM layer_metric""",
        ) == [(total,)]
        assert rows(pg_url, "SELECT count(*) FROM run") == [(RUNS,)]
    finally:
        chaos.stop_event.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            pytest.fail(f"the worker did not stop when told:\n{log.read_text()}")
    assert proc.returncode == 0, log.read_text()
    print(
        f"chaos: {chaos.rounds} rounds, {chaos.killed} backends killed; the worker logged "
        f"{log.read_text().count('database unreachable')} retries"
    )
