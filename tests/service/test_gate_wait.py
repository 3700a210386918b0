"""The gate's long poll (``wait_s``) and ``alphawatch gate --wait`` over real HTTP and PostgreSQL.

A step is registered pending, as discovery does, and completed from a thread about a second
later, as a worker does: the waiting request must answer with that step's verdict.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import update

from alphawatch.cli import main
from alphawatch.integrations.link import Client, LinkError
from alphawatch.service.api import create_app
from alphawatch.service.db import gate as gates
from alphawatch.service.db import queue
from alphawatch.service.db.models import Checkpoint, CheckpointStatus, utcnow
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from tests.factories import complete_next, layer_row, register_run
from tests.live import serve


@contextmanager
def _completed_later(url: str, alpha: float, delay_s: float = 1.0) -> Iterator[None]:
    """Completes the next queued checkpoint (every layer at ``alpha``) ``delay_s`` from now."""
    failures: list[BaseException] = []

    def work() -> None:
        try:
            complete_next(url, layers=lambda _step: [layer_row(alpha=alpha)])
        # Kept and failed on in the test's thread: a failure in a Timer thread is only printed.
        except BaseException as exc:
            failures.append(exc)

    timer = threading.Timer(delay_s, work)
    timer.start()
    try:
        yield
    finally:
        timer.join(timeout=30)
    assert not failures, failures


def _set_status(url: str, run_id: int, step: int, status: CheckpointStatus) -> None:
    with session_scope(make_engine(url)) as session:
        session.execute(
            update(Checkpoint)
            .where(Checkpoint.run_id == run_id, Checkpoint.step == step)
            .values(status=status.value)
        )


def test_gate_wait_answers_once_the_step_is_analysed(pg_url: str) -> None:
    run_id = register_run(pg_url, name="slow", steps=[100])
    with serve(create_app(Settings(database_url=pg_url))) as url:
        client = Client(url, timeout_s=10)
        assert client.gate(run_id, {"step": 100})["pending"] is True
        with _completed_later(pg_url, alpha=3.0):
            verdict = client.gate(run_id, {"step": 100}, wait_s=25)
        # The verdict of the analysed step, not the pending answer at the end of the wait.
        assert verdict["pending"] is False
        assert verdict["passed"] is True
        assert verdict["step"] == 100 and verdict["value"] == pytest.approx(3.0)


def test_gate_wait_that_runs_out_answers_pending(pg_url: str) -> None:
    run_id = register_run(pg_url, name="stuck", steps=[100])
    with serve(create_app(Settings(database_url=pg_url))) as url:
        verdict = Client(url, timeout_s=10).gate(run_id, {"step": 100}, wait_s=1)
        assert verdict["pending"] is True and verdict["passed"] is False
        assert [v["rule"] for v in verdict["violations"]] == ["no_data"]
        # strict: a pending gate is not a pass either.
        with pytest.raises(LinkError) as caught:
            Client(url, timeout_s=10).gate(run_id, {"step": 100, "strict": "true"}, wait_s=0.5)
        assert caught.value.status == 409


@pytest.mark.parametrize("wait_s", ["60.5", "-1", "nan"])
def test_gate_wait_outside_its_bound_is_refused(pg_url: str, wait_s: str) -> None:
    run_id = register_run(pg_url, name="bounded", steps=[100])
    with serve(create_app(Settings(database_url=pg_url))) as url:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{url}/api/v1/runs/{run_id}/gate?wait_s={wait_s}", timeout=10)
        assert caught.value.code == 422
        caught.value.close()


def test_a_failed_or_skipped_step_is_not_pending(pg_url: str) -> None:
    run_id = register_run(pg_url, name="past", steps=[300])
    engine = make_engine(pg_url)

    def pending(step: int | None) -> bool:
        with session_scope(engine) as session:
            return gates.pending(session, run_id=run_id, step=step)

    assert pending(None) and pending(300) and pending(200)
    complete_next(pg_url, layers=lambda _step: [layer_row()])
    assert not pending(None) and not pending(300)
    register_run(pg_url, name="past", steps=[100])
    assert pending(100)
    _set_status(pg_url, run_id, 100, CheckpointStatus.FAILED)
    assert not pending(100)
    # Step 200 was never registered: skipped only once step 300 was analysed a while ago.
    assert pending(200)
    with session_scope(engine) as session:
        session.execute(
            update(Checkpoint)
            .where(Checkpoint.run_id == run_id, Checkpoint.step == 300)
            .values(finished_at=utcnow() - timedelta(seconds=gates.SETTLE_S + 1))
        )
    assert not pending(200)
    # A step beyond the latest is still to come.
    assert pending(400)


@pytest.mark.parametrize(("alpha", "code"), [(3.0, 0), (9.0, 1)])
def test_cli_gate_wait_exit_codes(
    pg_url: str, capsys: pytest.CaptureFixture[str], alpha: float, code: int
) -> None:
    run_id = register_run(pg_url, name=f"cli-{code}", steps=[100])
    argv = ["gate", "--run", str(run_id), "--step", "100", "--wait"]
    with serve(create_app(Settings(database_url=pg_url))) as url:
        with _completed_later(pg_url, alpha=alpha):
            assert main([*argv, "--url", url, "--timeout", "25"]) == code
        assert '"pending": false' in capsys.readouterr().out


def test_cli_gate_wait_times_out_with_exit_2(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = register_run(pg_url, name="cli-timeout", steps=[100])
    # The server caps each wait low: the command asks again until its own timeout.
    app = create_app(Settings(database_url=pg_url, gate_wait_max_s=0.5))
    with serve(app) as url:
        argv = ["gate", "--url", url, "--run", "cli-timeout", "--step", "100", "--wait"]
        assert main([*argv, "--timeout", "2"]) == 2
        err = capsys.readouterr().err
        assert f"waiting for step 100 of run {run_id}" in err


def test_cli_gate_wait_on_a_skipped_step_answers_at_once(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = register_run(pg_url, name="kept-up", steps=range(100, 700, 100))
    with session_scope(make_engine(pg_url)) as session:
        queue.reorder(session, run_id=run_id)
        # Kept: 600 (the newest), 100 (the first), 300 (the middle); the rest skipped.
        assert queue.keep_up(session, run_id=run_id, bound=3) == 3
    complete_next(pg_url, layers=lambda _step: [layer_row(alpha=3.0)])
    with serve(create_app(Settings(database_url=pg_url))) as url:
        argv = ["gate", "--url", url, "--run", "kept-up", "--wait", "--timeout", "25"]
        started = time.monotonic()
        # The run moved past step 400 without it: the gate fails now, naming why.
        assert main([*argv, "--step", "400"]) == 1
        assert time.monotonic() - started < 10
        out = capsys.readouterr().out
        assert '"pending": false' in out and "skipped by the keep-up policy" in out
        assert main([*argv, "--step", "600"]) == 0
