"""Gate alerts end to end: verdicts recorded with the results, POSTed to a real receiver.

The receiver is a real ``http.server`` on a loopback port (tests/webhook.py); the database is
real (PostgreSQL and SQLite); the last two tests run the real worker on real checkpoint files.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from alphawatch.service.api import create_app
from alphawatch.service.db.alerts import GateCheck
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import TokenScope, create_token
from alphawatch.settings import Settings
from alphawatch.workers.alerts import AlertDispatcher, post_json
from alphawatch.workers.watcher import Watcher
from tests.db import rows, wait_until
from tests.factories import complete_next, layer_row, register_run
from tests.pg import free_port
from tests.webhook import TRICKLE_S, receiver

FAST = {
    "backoff_s": 0.2,
    "backoff_max_s": 5.0,
    "poll_s": 0.1,
    "timeout_s": 5.0,
    "min_interval_s": 0.0,
}


def _settings(url: str, hook: str, **alerts: Any) -> Settings:
    return Settings(
        database_url=url,
        device="cpu",
        settle_s=0.0,
        poll_interval_s=0.2,
        lease_s=30.0,
        heartbeat_s=0.5,
        alerts={"webhook_url": hook, **FAST, **alerts},
    )


def _check(settings: Settings) -> GateCheck:
    return GateCheck(
        defaults=settings.gate,
        method="ww",
        thresholds=settings.trust,
        notify=settings.alerts.webhook_url is not None,
    )


def _analysed(url: str, *, run: str, step: int, alpha: float, check: GateCheck) -> None:
    """A checkpoint of ``run`` at ``step`` whose 10 trusted layers have alpha near ``alpha``."""
    register_run(url, name=run, steps=[step], checkpoint_path="/r/{name}/{step}")
    done, _ = complete_next(
        url,
        gate=check,
        layers=lambda _: [
            layer_row(f"model.layers.{i}.mlp.up_proj", block=i, alpha=alpha + 0.01 * (i - 5))
            for i in range(10)
        ],
    )
    assert done == step


def test_a_flip_is_delivered_once_with_its_reasons(db_url: str) -> None:
    with receiver() as hook:
        settings = _settings(db_url, hook.url)
        check = _check(settings)
        dispatcher = AlertDispatcher(settings.alerts, make_engine(db_url), "w1")
        dispatcher.start()
        try:
            _analysed(db_url, run="llama<&>", step=100, alpha=3.0, check=check)  # passes: quiet
            _analysed(db_url, run="llama<&>", step=200, alpha=7.0, check=check)  # fails: alert
            dispatcher.wake()
            wait_until(lambda: len(hook.received) >= 1, 20, "the first delivery")
            _analysed(db_url, run="llama<&>", step=300, alpha=7.2, check=check)  # still fails
            _analysed(db_url, run="llama<&>", step=400, alpha=3.5, check=check)  # passes again
            dispatcher.wake()
            wait_until(lambda: len(hook.received) >= 2, 20, "the second delivery")
            time.sleep(1.0)  # several polls: nothing else may arrive
        finally:
            dispatcher.stop()
        assert len(hook.received) == 2
    failed, passed = hook.bodies()
    alert_ids = [r[0] for r in rows(db_url, "SELECT id FROM alert ORDER BY id")]
    assert failed["id"] == alert_ids[0] and passed["id"] == alert_ids[1]
    assert failed["run"] == {"id": 1, "name": "llama<&>"}
    assert (failed["step"], failed["verdict"], failed["previous"]) == (200, "fail", "pass")
    assert [v["rule"] for v in failed["violations"]] == ["max_alpha"]
    assert failed["violations"][0]["threshold"] == 6.0
    assert failed["value"] == pytest.approx(7.0 - 0.005)  # median of the ten layers
    assert failed["text"].startswith(
        "alphawatch: run llama&lt;&amp;&gt; FAILS its gate at step 200"
    )
    assert "is above 6" in failed["text"]
    assert (passed["step"], passed["verdict"], passed["previous"]) == (400, "pass", "fail")
    assert passed["violations"] == [] and "passes its gate again" in passed["text"]
    first = hook.received[0]
    assert first.path == "/hooks/alphawatch?channel=ml"
    assert first.headers["Content-Type"] == "application/json"

    with TestClient(create_app(Settings(database_url=db_url))) as client:
        listed = client.get("/api/v1/runs/1/alerts").json()["alerts"]
        gate = client.get("/api/v1/runs/1/gate").json()
    assert [
        (a["step"], a["verdict"], a["status"], a["attempts"], a["last_status_code"]) for a in listed
    ] == [(400, "pass", "delivered", 1, 200), (200, "fail", "delivered", 1, 200)]
    assert listed[1]["body"] == failed
    assert gate["passed"] and gate["step"] == 400


def test_a_run_that_starts_failing_alerts_and_no_webhook_means_no_alert(db_url: str) -> None:
    settings = Settings(database_url=db_url)
    _analysed(db_url, run="quiet", step=1, alpha=7.0, check=_check(settings))
    assert rows(db_url, "SELECT count(*) FROM alert") == [(0,)]
    # The verdict is recorded all the same (it is what /metrics reports).
    assert rows(db_url, "SELECT passed, step FROM run_gate") == [(False, 1)]
    with receiver() as hook:
        loud = _settings(db_url, hook.url)
        _analysed(db_url, run="loud", step=1, alpha=7.0, check=_check(loud))
        dispatcher = AlertDispatcher(loud.alerts, make_engine(db_url), "w1")
        assert dispatcher.deliver_due() == 1
    (body,) = hook.bodies()
    assert (body["run"]["name"], body["verdict"], body["previous"]) == ("loud", "fail", None)


def test_a_failing_receiver_is_retried_with_backoff(db_url: str) -> None:
    with receiver([503, 500]) as hook:
        settings = _settings(db_url, hook.url)
        dispatcher = AlertDispatcher(settings.alerts, make_engine(db_url), "w1")
        dispatcher.start()
        try:
            _analysed(db_url, run="r", step=1, alpha=7.0, check=_check(settings))
            dispatcher.wake()
            wait_until(
                lambda: rows(db_url, "SELECT status FROM alert") == [("delivered",)],
                30,
                "the delivery after two failures",
            )
        finally:
            dispatcher.stop()
    times = [r.at for r in hook.received]
    assert len(times) == 3 and len({json.dumps(b) for b in hook.bodies()}) == 1
    # Exponential: 0.2 s after the first failure, 0.4 s after the second.
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4
    assert rows(db_url, "SELECT attempts, last_status_code, last_error FROM alert") == [
        (3, 200, None)
    ]


def test_a_stopped_receiver_ends_failed_after_its_attempts(db_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    settings = _settings(db_url, dead, max_attempts=3, backoff_s=0.05)
    dispatcher = AlertDispatcher(settings.alerts, make_engine(db_url), "w1")
    dispatcher.start()
    try:
        _analysed(db_url, run="r", step=1, alpha=7.0, check=_check(settings))
        dispatcher.wake()
        wait_until(
            lambda: rows(db_url, "SELECT status FROM alert") == [("failed",)],
            30,
            "the delivery to give up",
        )
        # The thread goes on: a later alert is attempted too.
        _analysed(db_url, run="r", step=2, alpha=3.0, check=_check(settings))
        dispatcher.wake()
        wait_until(
            lambda: len(rows(db_url, "SELECT id FROM alert WHERE status = 'failed'")) == 2,
            30,
            "the second alert to be attempted",
        )
    finally:
        dispatcher.stop()
    attempts, error = rows(db_url, "SELECT attempts, last_error FROM alert ORDER BY id")[0]
    assert attempts == 3 and "ConnectionRefusedError" in error
    assert "/hook" not in error  # the URL may hold a secret: only the host is named


def test_answers_that_retrying_cannot_change_fail_at_once() -> None:
    with receiver([404, 302, 429]) as hook:
        body = b'{"text": "x"}'
        gone = post_json(hook.url, body, timeout_s=5)
        moved = post_json(hook.url, body, timeout_s=5)
        busy = post_json(hook.url, body, timeout_s=5)
        fine = post_json(hook.url, body, timeout_s=5)
    assert (gone.status_code, gone.retry) == (404, False) and "receiver says no" in str(gone.error)
    assert (moved.status_code, moved.retry) == (302, False)
    assert "redirects are not followed" in str(moved.error)
    assert (busy.status_code, busy.retry) == (429, True)
    assert (fine.status_code, fine.error) == (200, None)


def _alert_rows(url: str) -> list[tuple[str, str, str | None]]:
    return rows(
        url,
        "SELECT r.name, a.status, a.last_error FROM alert a JOIN run r "
        "ON r.id = a.run_id ORDER BY a.id",
    )


def test_a_trickling_answer_is_cut_off_at_the_deadline() -> None:
    with receiver(trickle=frozenset({"slow"})) as hook:
        started = time.monotonic()
        attempt = post_json(hook.url, b'{"run": {"name": "slow"}}', timeout_s=1.0)
        took = time.monotonic() - started
    assert (attempt.status_code, attempt.retry) == (None, True)
    assert "no complete answer within 1s" in str(attempt.error)
    # A byte every 0.2 s never trips a 1 s timeout per read: only a deadline ends it this soon.
    assert took < 1.0 + 10 < TRICKLE_S


def test_a_trickling_receiver_holds_one_alert_to_its_deadline_and_no_other(db_url: str) -> None:
    timeout_s = 5.0
    with receiver(trickle=frozenset({"slow"})) as hook:
        settings = _settings(db_url, hook.url, timeout_s=timeout_s, max_attempts=1)
        check = _check(settings)
        dispatcher = AlertDispatcher(settings.alerts, make_engine(db_url), "w1")
        dispatcher.start()
        try:
            _analysed(db_url, run="slow", step=1, alpha=7.0, check=check)
            dispatcher.wake()
            wait_until(lambda: hook.trickling > 0, 20, "the slow run's answer to trickle")
            first = hook.received[0].at
            _analysed(db_url, run="fast", step=1, alpha=7.0, check=check)
            dispatcher.wake()
            wait_until(
                lambda: rows(db_url, "SELECT status FROM alert WHERE id = 2") == [("delivered",)],
                20,
                "the fast run's alert",
            )
            # The slow alert's first attempt ends at its deadline (with slack for a busy
            # machine), far before the receiver would have stopped trickling.
            wait_until(
                lambda: rows(db_url, "SELECT status FROM alert WHERE id = 1") == [("failed",)],
                first + timeout_s + 10 - time.monotonic(),
                "the slow alert's attempt to be cut off",
            )
        finally:
            dispatcher.stop()
        fast = next(r for r in hook.received if r.body["run"]["name"] == "fast")
    assert fast.trickling == 1  # delivered while the slow alert's answer was trickling in
    (error,) = rows(db_url, "SELECT last_error FROM alert WHERE id = 1")[0]
    assert f"no complete answer within {timeout_s:g}s" in error


def _write_token(url: str) -> dict[str, str]:
    with session_scope(make_engine(url)) as session:
        token = create_token(session, name="ci", scope=TokenScope.WRITE)
    return {"Authorization": f"Bearer {token}"}


def test_a_flapping_verdict_is_coalesced_and_the_latest_goes_last(db_url: str) -> None:
    min_interval_s = 1.0
    with receiver() as hook:
        settings = _settings(db_url, hook.url, min_interval_s=min_interval_s)
        _analysed(db_url, run="flap", step=1, alpha=3.0, check=_check(settings))  # passes
        dispatcher = AlertDispatcher(settings.alerts, make_engine(db_url), "w1")
        dispatcher.start()
        write = _write_token(db_url)
        try:
            with TestClient(create_app(settings)) as client:
                started = time.monotonic()
                for i in range(40):  # fails under max_alpha 2.5, passes under the defaults
                    rules = {"max_alpha": 2.5} if i % 2 == 0 else {}
                    put = client.put("/api/v1/runs/1/gate-rules", json=rules, headers=write)
                    assert put.status_code == 200
                    dispatcher.wake()
                final = put.json()["last_verdict"]["passed"]
                wait_until(
                    lambda: (
                        rows(
                            db_url,
                            "SELECT count(*) FROM alert WHERE status IN ('pending', 'sending')",
                        )
                        == [(0,)]
                    ),
                    30,
                    "every alert to be settled",
                )
                elapsed = time.monotonic() - started
        finally:
            dispatcher.stop()
    posts = hook.bodies()
    assert 1 <= len(posts) <= math.ceil(elapsed / min_interval_s) + 1
    assert posts[-1]["verdict"] == ("pass" if final else "fail")
    statuses = [r[0] for r in rows(db_url, "SELECT status FROM alert ORDER BY id")]
    assert len(statuses) == 40 and set(statuses) <= {"delivered", "superseded"}
    assert statuses.count("delivered") == len(posts)


def test_a_verdict_back_to_the_one_delivered_is_not_sent_again(db_url: str) -> None:
    with receiver() as hook:
        settings = _settings(db_url, hook.url, min_interval_s=3600.0)
        check = _check(settings)
        dispatcher = AlertDispatcher(settings.alerts, make_engine(db_url), "w1")
        _analysed(db_url, run="r", step=1, alpha=7.0, check=check)  # fails
        assert dispatcher.deliver_due() == 1
        _analysed(db_url, run="r", step=2, alpha=3.0, check=check)  # passes: within the hour
        assert dispatcher.deliver_due() == 0
        _analysed(db_url, run="r", step=3, alpha=7.0, check=check)  # fails, as was last told
        assert dispatcher.deliver_due() == 0
    assert [b["verdict"] for b in hook.bodies()] == ["fail"]
    (_, one, _), (_, two, replaced), (_, three, back) = _alert_rows(db_url)
    assert (one, two, three) == ("delivered", "superseded", "superseded")
    assert "superseded by a newer verdict" in str(replaced)
    assert "back to the one alert 1 delivered" in str(back)


def test_a_failed_attempt_is_not_retried_once_the_verdict_changed(db_url: str) -> None:
    with receiver([503]) as hook:
        # A retry 2 s later: on a loaded machine, 0.2 s can pass before the same delivery pass
        # claims again, and the retry would then be sent in it.
        settings = _settings(db_url, hook.url, backoff_s=2.0)
        check = _check(settings)
        dispatcher = AlertDispatcher(settings.alerts, make_engine(db_url), "w1")
        _analysed(db_url, run="r", step=1, alpha=7.0, check=check)  # fails: answered 503
        assert dispatcher.deliver_due() == 1
        _analysed(db_url, run="r", step=2, alpha=3.0, check=check)  # passes
        time.sleep(2.1)  # the first alert's retry is due
        assert dispatcher.deliver_due() == 1
    assert [b["verdict"] for b in hook.bodies()] == ["fail", "pass"]
    (_, first, error), (_, second, _) = _alert_rows(db_url)
    assert (first, second) == ("superseded", "delivered")
    assert str(error).startswith("127.0.0.1 answered HTTP 503")


def test_a_fault_while_sending_is_recorded_and_the_senders_go_on(db_url: str) -> None:
    # A host name no resolver takes: the IDNA codec refuses a label over 63 characters with a
    # UnicodeError, which is no network error.
    settings = _settings(db_url, f"http://{'a' * 64}.example/hook", max_attempts=2, backoff_s=0.05)
    dispatcher = AlertDispatcher(settings.alerts, make_engine(db_url), "w1")
    dispatcher.start()
    try:
        _analysed(db_url, run="r", step=1, alpha=7.0, check=_check(settings))
        dispatcher.wake()
        wait_until(
            lambda: rows(db_url, "SELECT status FROM alert") == [("failed",)],
            20,
            "the alert to fail after its attempts",
        )
        # The senders go on: another run's alert is attempted too.
        _analysed(db_url, run="s", step=1, alpha=7.0, check=_check(settings))
        dispatcher.wake()
        wait_until(
            lambda: rows(db_url, "SELECT status FROM alert WHERE id = 2") == [("failed",)],
            20,
            "the second alert to be attempted",
        )
    finally:
        dispatcher.stop()
    for attempts, error in rows(db_url, "SELECT attempts, last_error FROM alert"):
        assert attempts == 2 and "UnicodeError" in error


def test_a_failing_database_is_retried_with_a_growing_pause(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with receiver() as hook:
        settings = _settings(pg_url, hook.url, senders=1, backoff_s=0.1)
        _analysed(pg_url, run="r", step=1, alpha=7.0, check=_check(settings))
        engine = make_engine(pg_url)
        with engine.begin() as connection:  # every claim now fails, as on a full disk
            connection.exec_driver_sql(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'could not extend file'; END $$; "
                "CREATE TRIGGER refuse BEFORE UPDATE ON alert EXECUTE FUNCTION refuse()"
            )
        dispatcher = AlertDispatcher(settings.alerts, engine, "w1")
        with caplog.at_level(logging.ERROR, logger="alphawatch.alerts"):
            dispatcher.start()
            try:
                wait_until(lambda: len(caplog.records) >= 4, 20, "four failed passes")
                with engine.begin() as connection:
                    connection.exec_driver_sql("DROP TRIGGER refuse ON alert")
                wait_until(lambda: len(hook.received) == 1, 20, "the delivery once it heals")
            finally:
                dispatcher.stop()
    failed = [r for r in caplog.records if "alert delivery failed" in r.getMessage()]
    assert "could not extend file" in str(failed[0].exc_info)
    gaps = [b.created - a.created for a, b in itertools.pairwise(failed)]
    # The pause doubles: 0.1 s, 0.2 s, 0.4 s (a busy machine only lengthens them).
    assert all(gap >= 0.1 * 2**i for i, gap in enumerate(gaps[:3]))
    assert rows(pg_url, "SELECT status FROM alert") == [("delivered",)]


def test_a_dead_sender_is_taken_over_after_its_lease(db_url: str) -> None:
    with receiver() as hook:
        settings = _settings(db_url, hook.url)
        _analysed(db_url, run="r", step=1, alpha=7.0, check=_check(settings))
        # A worker claimed it and died before recording anything: its lease ran out.
        engine = make_engine(db_url)
        from alphawatch.service.db import alerts

        with session_scope(engine) as session:
            assert alerts.claim(session, worker_id="dead", lease_s=0.0) is not None
        time.sleep(0.05)
        assert AlertDispatcher(settings.alerts, engine, "w2").deliver_due() == 1
    assert len(hook.received) == 1
    assert rows(db_url, "SELECT status, attempts FROM alert") == [("delivered", 2)]


def _checkpoint(run: Path, step: int) -> None:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(step)
    save_file(
        {
            f"model.layers.{i}.mlp.up_proj.weight": torch.randn(96, 64, generator=g)
            for i in range(3)
        },
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def _done(url: str) -> list[int]:
    return [
        r[0] for r in rows(url, "SELECT step FROM checkpoint WHERE status = 'done' ORDER BY step")
    ]


def test_a_hanging_receiver_never_delays_the_analysis(pg_url: str, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "hang"
    _checkpoint(run, 1)
    with receiver() as hook:
        hook.hang.set()
        # No alpha passes: the first verdict fails and alerts; the later ones do not change.
        settings = _settings(pg_url, hook.url, timeout_s=60.0)
        settings = settings.model_copy(
            update={"gate": settings.gate.merged({"min_alpha": None, "max_alpha": 0.5})}
        )
        watcher = Watcher(settings, [run])
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run_forever, args=(stop,), daemon=True)
        thread.start()
        try:
            wait_until(lambda: len(hook.received) == 1, 120, "the alert to reach the receiver")
            # The receiver now holds the delivery; the worker must go on analysing.
            held = time.monotonic()
            _checkpoint(run, 2)
            _checkpoint(run, 3)
            wait_until(lambda: _done(pg_url) == [1, 2, 3], 90, "the next checkpoints")
            analysed_in = time.monotonic() - held
            assert rows(pg_url, "SELECT status, attempts FROM alert") == [("sending", 1)]
            assert len(hook.received) == 1
        finally:
            hook.release.set()
            stop.set()
            thread.join(timeout=60)
    assert analysed_in < 60  # within the receiver's hold, which had not ended
    wait_until(
        lambda: rows(pg_url, "SELECT status FROM alert") == [("delivered",)],
        10,
        "the held delivery to be recorded",
    )


def test_the_worker_goes_on_when_the_receiver_is_gone(sqlite_url: str, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "gone"
    _checkpoint(run, 1)
    _checkpoint(run, 2)
    dead = f"http://127.0.0.1:{free_port()}/hook"
    settings = _settings(sqlite_url, dead, max_attempts=2, backoff_s=0.05)
    settings = settings.model_copy(
        update={"gate": settings.gate.merged({"min_alpha": None, "max_alpha": 0.5})}
    )
    watcher = Watcher(settings, [run])
    assert watcher.run_once() == 2
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-3")
    (run / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: rows(sqlite_url, "SELECT status FROM alert") == [("failed",)],
            60,
            "the alert to fail",
        )
        wait_until(lambda: _done(sqlite_url) == [1, 2, 3], 60, "the next checkpoint")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert rows(sqlite_url, "SELECT attempts FROM alert") == [(2,)]
