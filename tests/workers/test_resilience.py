"""No name, fault or lost connection ends a worker: real workers on a real PostgreSQL.

Each test builds the fault for real: names taken through the API with a write token, a
trigger that terminates the worker's own connection in the middle of a unit of work, a
database that refuses one checkpoint's rows, a database stopped under a running
``alphawatch watch`` process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from alphawatch.service.api import create_app
from alphawatch.service.db import queue
from alphawatch.service.db import session as db_session
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import TokenScope, create_token
from alphawatch.workers.watcher import Watcher
from tests import pg
from tests.db import rows, wait_until
from tests.factories import worker_settings
from tests.workers.small import MATRICES, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _sql(url: str, statement: str) -> None:
    with psycopg.connect(pg.libpq_dsn(url), autocommit=True) as conn:
        conn.execute(statement)


@contextmanager
def _running(watcher: Watcher) -> Iterator[threading.Thread]:
    """``watcher.run_forever`` in a thread, stopped (and seen to stop) on the way out."""
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the worker did not stop when told"


def _statuses(url: str) -> list[tuple[str, int, str]]:
    return sorted(
        rows(url, "SELECT r.path, c.step, c.status FROM checkpoint c JOIN run r ON r.id = c.run_id")
    )


@pytest.mark.slow
def test_names_taken_through_the_api_never_stop_discovery(tmp_path: Path, pg_url: str) -> None:
    """A write token holder takes the folder's name, every numbered form the worker tried
    (``-2`` … ``-999``) and the form with a hash of the path: the run is still created (under
    a random suffix) and analysed, beside the other runs, and the worker lives on."""
    root = (tmp_path / "runs").resolve()
    victim, good = root / "victim", root / "good"
    write_checkpoint(victim, 1, seed=1)
    write_checkpoint(good, 1, seed=2)
    settings = worker_settings(pg_url, allowed_roots=[root])
    with session_scope(make_engine(pg_url)) as session:
        token = create_token(session, name="squatter", scope=TokenScope.WRITE)
    hashed = "victim-" + hashlib.sha256(str(victim).encode()).hexdigest()[:8]
    taken = ["victim", *(f"victim-{n}" for n in range(2, 1000)), hashed]
    squat = root / "squat"
    with TestClient(create_app(settings)) as client:
        for n, name in enumerate(taken):
            folder = squat / str(n)
            folder.mkdir(parents=True)
            answer = client.post(
                "/api/v1/runs",
                json={"name": name, "path": str(folder)},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert answer.status_code == 201, answer.text
    shutil.rmtree(squat)  # the names stay taken; their runs have nothing to discover

    watcher = Watcher(settings, [victim, good])
    with _running(watcher) as thread:
        wait_until(
            lambda: _statuses(pg_url) == [(str(good), 1, "done"), (str(victim), 1, "done")],
            90,
            "both runs to be analysed",
        )
        assert thread.is_alive()
        assert watcher.health.trouble() is None
    ((name,),) = rows(pg_url, f"SELECT name FROM run WHERE path = '{victim}'")
    assert name.startswith("victim-") and name not in taken


def test_a_connection_lost_inside_the_gate_verdict_retries_the_write_whole(
    tmp_path: Path, pg_url: str
) -> None:
    """The database terminates the worker's connection while the gate verdict is written
    (inside the savepoint that keeps a failing gate from costing the results): the whole
    write is made again on a fresh connection; one analysis, one attempt, one set of rows."""
    run = tmp_path / "runs" / "gated"
    write_checkpoint(run, 1, seed=3)
    # A sequence is not rolled back with the transaction: the trigger kills exactly once.
    _sql(
        pg_url,
        """
        CREATE SEQUENCE kill_once;
        CREATE FUNCTION kill_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('kill_once') = 1 THEN
                PERFORM pg_terminate_backend(pg_backend_pid());
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER kill_once BEFORE INSERT OR UPDATE ON run_gate
            FOR EACH ROW EXECUTE FUNCTION kill_once();
    """,
    )
    assert Watcher(worker_settings(pg_url), [run]).run_once() == 1
    assert rows(pg_url, "SELECT last_value > 1 FROM kill_once") == [(True,)]
    assert rows(
        pg_url,
        "SELECT c.status, c.analysis_count, j.status, j.attempts "
        "FROM checkpoint c JOIN analysis_job j ON j.checkpoint_id = c.id",
    ) == [("done", 1, "done", 1)]
    assert sorted(n for (n,) in rows(pg_url, "SELECT name FROM layer_metric")) == sorted(MATRICES)
    assert rows(pg_url, "SELECT count(*) FROM run_gate WHERE passed IS NOT NULL") == [(1,)]


def test_a_claim_whose_answer_was_lost_is_taken_back_on_the_same_attempt(
    tmp_path: Path, pg_url: str
) -> None:
    """The claim committed, and its answer was lost with the connection: the worker holds a
    job it does not know of. Its next claim takes that job back instead of leaving its lease
    to run out and cost a second attempt."""
    run = tmp_path / "runs" / "r"
    write_checkpoint(run, 1, seed=9)
    watcher = Watcher(worker_settings(pg_url), [run])
    watcher.discover_once()
    with session_scope(make_engine(pg_url)) as session:
        assert queue.claim(session, worker_id=watcher.worker_id, lease_s=30) is not None
    watcher._claim_unsure = True  # what the claim's lost connection left behind
    assert watcher.process_one(ask_first=True)
    assert rows(
        pg_url,
        "SELECT c.status, j.status, j.attempts, c.analysis_count FROM "
        "checkpoint c JOIN analysis_job j ON j.checkpoint_id = c.id",
    ) == [("done", "done", 1, 1)]


def test_a_database_refusing_one_checkpoints_rows_fails_that_checkpoint_alone(
    tmp_path: Path, pg_url: str
) -> None:
    """A database that answers one checkpoint's write with an error (not a lost connection):
    that attempt fails with the database's message, the worker lives on and analyses the rest."""
    root = tmp_path / "runs"
    write_checkpoint(root / "poison", 1, seed=4)
    write_checkpoint(root / "good", 1, seed=5)
    write_checkpoint(root / "good", 2, seed=6)
    _sql(
        pg_url,
        """
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (SELECT path FROM checkpoint WHERE id = NEW.checkpoint_id) LIKE '%/poison/%' THEN
                RAISE EXCEPTION 'no room for the layer rows of this checkpoint';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON layer_metric
            FOR EACH ROW EXECUTE FUNCTION refuse();
    """,
    )
    watcher = Watcher(worker_settings(pg_url, max_attempts=2), [root / "poison", root / "good"])
    with _running(watcher) as thread:
        wait_until(
            lambda: [s for _, _, s in _statuses(pg_url)] == ["done", "done", "failed"],
            90,
            "the good run analysed, the refused checkpoint failed",
        )
        assert thread.is_alive()
    ((error, attempts),) = rows(
        pg_url,
        "SELECT c.error, j.attempts FROM checkpoint c JOIN "
        "analysis_job j ON j.checkpoint_id = c.id "
        "WHERE c.status = 'failed'",
    )
    assert "no room for the layer rows" in error and attempts == 2
    assert rows(pg_url, "SELECT count(*) FROM layer_metric") == [(2 * len(MATRICES),)]


def test_discovery_refused_by_the_database_is_reported_and_outlived(
    tmp_path: Path, pg_url: str
) -> None:
    """Every discovery query fails (the run table is gone): the discovery loop records why,
    backs off and goes on; once the table is back, the run is analysed by the same worker."""
    run = tmp_path / "runs" / "r"
    write_checkpoint(run, 1, seed=7)
    watcher = Watcher(worker_settings(pg_url), [run])
    _sql(pg_url, "ALTER TABLE run RENAME TO run_hidden")
    with _running(watcher) as thread:
        wait_until(
            lambda: watcher.health.errors.get("discovery", 0) >= 2, 60, "discovery to fail twice"
        )
        trouble = watcher.health.trouble()
        assert trouble is not None and "discovery failing" in trouble and "run" in trouble
        assert thread.is_alive()
        _sql(pg_url, "ALTER TABLE run_hidden RENAME TO run")
        wait_until(
            lambda: _statuses(pg_url) == [(str(run), 1, "done")],
            90,
            "the run to be analysed once the table is back",
        )
        wait_until(lambda: watcher.health.trouble() is None, 30, "discovery to report health")
        assert thread.is_alive()


@pytest.mark.slow
def test_a_worker_told_to_stop_while_the_database_is_away_exits_within_seconds(
    tmp_path: Path, throwaway_cluster: Callable[[], pg.Cluster]
) -> None:
    cluster = throwaway_cluster()
    run = tmp_path / "runs" / "r"
    write_checkpoint(run, 1, seed=8)
    env = {**os.environ, "ALPHAWATCH_SETTLE_S": "0", "ALPHAWATCH_DEVICE": "cpu"}
    log = tmp_path / "watch.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "alphawatch",
                "watch",
                str(run),
                "--db",
                cluster.url,
                "--poll",
                "0.2",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        wait_until(
            lambda: rows(cluster.url, "SELECT status FROM checkpoint") == [("done",)],
            90,
            "the checkpoint",
        )
        cluster.stop()
        # Long enough for every loop to be deep in its retries (pauses of 4 s and more).
        wait_until(
            lambda: log.read_text().count("database unreachable") >= 10,
            60,
            "the worker to retry a while",
        )
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit within 10 s of SIGTERM:\n{log.read_text()}")
        assert proc.returncode == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_a_server_that_never_answers_is_given_up_on_after_the_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host that accepts the connection and then says nothing (gone behind a dead route):
    connecting fails after the connect timeout, for the worker to retry or stop, instead of
    waiting for ever."""
    monkeypatch.setattr(db_session, "CONNECT_TIMEOUT_S", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nothing ever answers
        port = silent.getsockname()[1]
        engine = make_engine(f"postgresql+psycopg://alphawatch@127.0.0.1:{port}/alphawatch")
        try:
            with pytest.raises(OperationalError), engine.connect():
                pass
        finally:
            db_session.dispose_all()
