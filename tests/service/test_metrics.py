"""/metrics read with Prometheus' own parser: the same numbers as the trend and the gate."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, update

from alphawatch.service.api import create_app
from alphawatch.service.db import queue, registry
from alphawatch.service.db.alerts import GateCheck
from alphawatch.service.db.models import Checkpoint
from alphawatch.service.db.session import make_engine, session_scope, utcnow
from alphawatch.settings import Settings
from alphawatch.trust import Thresholds
from tests.factories import STEPS, analysed_run, random_layers

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "alphawatch.json"
LEVELS = ("median", "mean", "trimmed_mean", "p10", "p25", "p75", "p90")
ELAPSED = {100: 0.4, 200: 7.0, 300: 4000.0}


def _run(url: str, name: str, seed: int, check: GateCheck) -> None:
    """A run of three analysed checkpoints, the worker's way (verdict recorded)."""
    rng = np.random.default_rng(seed)
    analysed_run(
        url,
        name=name,
        steps=STEPS,
        layers=lambda _: random_layers(rng),
        elapsed_s=lambda step: ELAPSED[step],
        thresholds=Thresholds(),
        gate=check,
    )


def _failed_checkpoint(url: str) -> None:
    with session_scope(make_engine(url)) as session:
        registry.register_checkpoint(
            session, run_id=1, step=999, path="/r/999", fingerprint="x", fmt="hf"
        )
    with session_scope(make_engine(url)) as session:
        job = queue.claim(session, worker_id="t", lease_s=60)
    assert job is not None
    with session_scope(make_engine(url)) as session:
        queue.fail(session, job_id=job.job_id, worker_id="t", error="unreadable", max_attempts=1)


def _scrape(client: TestClient) -> dict[str, Any]:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def _value(samples: dict[str, Any], name: str, **labels: str) -> Any:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    settings = Settings(database_url=db_url)
    check = GateCheck(defaults=settings.gate, method="ww", thresholds=settings.trust, notify=False)
    _run(db_url, "passes", 0, check)
    # A narrower band for the second run, stored before its checkpoints are analysed.
    strict = check.defaults.merged({"max_alpha": 2.5})
    _run(
        db_url,
        "fails",
        1,
        GateCheck(defaults=strict, method="ww", thresholds=settings.trust, notify=False),
    )
    _failed_checkpoint(db_url)
    with TestClient(create_app(settings)) as c:
        yield c


def test_metrics_equal_the_trend_and_the_gate(client: TestClient) -> None:
    samples = _scrape(client)
    for run_id, name in ((1, "passes"), (2, "fails")):
        for stat in LEVELS:
            trend = client.get(f"/api/v1/runs/{run_id}/trend", params={"stat": stat}).json()
            last = trend["points"][-1]
            assert _value(samples, "alphawatch_run_alpha", run=name, stat=stat) == pytest.approx(
                last["value"], rel=1e-12
            ), (name, stat)
        assert _value(samples, "alphawatch_run_last_step", run=name) == last["step"]
        gate = client.get(
            f"/api/v1/runs/{run_id}/gate", params={"max_alpha": 6 if run_id == 1 else 2.5}
        ).json()
        assert _value(samples, "alphawatch_run_untrusted_ratio", run=name) == pytest.approx(
            gate["untrusted_share"], rel=1e-12
        )
        assert _value(samples, "alphawatch_run_gate_passed", run=name) == float(gate["passed"])
    assert _value(samples, "alphawatch_run_gate_passed", run="passes") == 1.0
    assert _value(samples, "alphawatch_run_gate_passed", run="fails") == 0.0
    # No per-layer series: runs and statistics are the only labels.
    assert {dict(k[1]).keys() - {"run", "stat", "status", "le"} == set() for k in samples} == {True}


def test_analysis_counts_and_durations(client: TestClient) -> None:
    samples = _scrape(client)
    assert _value(samples, "alphawatch_checkpoints_analyzed_total", status="done") == 6
    assert _value(samples, "alphawatch_checkpoints_analyzed_total", status="failed") == 1
    assert _value(samples, "alphawatch_checkpoints_analyzed_total", status="vanished") == 0
    hist = "alphawatch_checkpoint_analysis_seconds"
    assert _value(samples, f"{hist}_count") == 6
    assert _value(samples, f"{hist}_sum") == pytest.approx(2 * sum(ELAPSED.values()))
    assert _value(samples, f"{hist}_bucket", le="1.0") == 2  # 0.4 s, twice
    assert _value(samples, f"{hist}_bucket", le="10.0") == 4
    assert _value(samples, f"{hist}_bucket", le="3600.0") == 4
    assert _value(samples, f"{hist}_bucket", le="14400.0") == 6
    assert _value(samples, f"{hist}_bucket", le="+Inf") == 6
    # The metrics that were there before stay.
    assert _value(samples, "alphawatch_checkpoints", status="done") == 6
    assert _value(samples, "alphawatch_checkpoints", status="failed") == 1
    assert _value(samples, "alphawatch_queue_depth") == 0
    assert _value(samples, "alphawatch_runs") == 2


@contextmanager
def _statements(url: str) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    engine = make_engine(url)
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


@pytest.mark.slow
def test_a_scrape_costs_the_same_queries_for_any_number_of_runs(
    client: TestClient, db_url: str
) -> None:
    with _statements(db_url) as few:
        _scrape(client)
    settings = Settings(database_url=db_url)
    check = GateCheck(defaults=settings.gate, method="ww", thresholds=settings.trust, notify=False)
    for seed in range(5):
        _run(db_url, f"more-{seed}", seed + 10, check)
    with _statements(db_url) as many:
        samples = _scrape(client)
    assert len(many) == len(few) <= 8
    assert _value(samples, "alphawatch_runs") == 7


def test_the_grafana_dashboard_queries_only_exported_metrics(client: TestClient) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    exprs.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    queried = {m for e in exprs for m in re.findall(r"\balphawatch_[a-z_]+\b", e)}
    exported = {name for name, _labels in _scrape(client)}
    assert queried, "the dashboard queries nothing"
    assert queried <= exported, f"not exported: {sorted(queried - exported)}"
    # Every metric family the issue names is on the dashboard.
    assert {
        "alphawatch_run_alpha",
        "alphawatch_run_untrusted_ratio",
        "alphawatch_run_gate_passed",
        "alphawatch_run_last_step",
        "alphawatch_checkpoints_analyzed_total",
        "alphawatch_checkpoint_analysis_seconds_bucket",
    } <= queried
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])


# A run name is user data: quotes, a backslash and a newline must reach Prometheus escaped.
LAGGING = 'lag "behind"\\ run\nname'
WAITED_S = {1: 600.0, 2: 300.0, 3: 60.0}


def _lagging_run(url: str) -> tuple[datetime, int]:
    """Three checkpoints of a new run queued 600, 300 and 60 s ago, one being analysed; the
    done checkpoints of run 1 queued at one instant and finished ``step`` seconds later.

    Returns the instant the waits are counted from and the step a worker claimed.
    """
    now = utcnow()
    with session_scope(make_engine(url)) as session:
        run_id = registry.ensure_run(session, name=LAGGING, path="/r/lagging")
        for step, waited in WAITED_S.items():
            checkpoint_id = registry.register_checkpoint(
                session,
                run_id=run_id,
                step=step,
                path=f"/r/lagging/{step}",
                fingerprint="x",
                fmt="hf",
            )
            session.execute(
                update(Checkpoint)
                .where(Checkpoint.id == checkpoint_id)
                .values(discovered_at=now - timedelta(seconds=waited))
            )
        start = now - timedelta(days=1)
        for step in STEPS:
            session.execute(
                update(Checkpoint)
                .where(Checkpoint.run_id == 1, Checkpoint.step == step)
                .values(discovered_at=start, finished_at=start + timedelta(seconds=step))
            )
    with session_scope(make_engine(url)) as session:
        job = queue.claim(session, worker_id="t", lease_s=600)
    assert job is not None and job.run_id == run_id
    return now, job.step


def test_lag_is_on_the_metrics_and_the_api(client: TestClient, db_url: str) -> None:
    now, claimed = _lagging_run(db_url)
    samples = _scrape(client)
    listed = {r["name"]: r for r in client.get("/api/v1/runs").json()["runs"]}
    detail = client.get(f"/api/v1/runs/{listed[LAGGING]['id']}").json()
    elapsed = (utcnow() - now).total_seconds()

    def waited(value: float, expected: float) -> bool:
        return expected <= value <= expected + elapsed

    assert _value(samples, "alphawatch_run_lag_checkpoints", run=LAGGING) == 3
    assert waited(_value(samples, "alphawatch_run_lag_seconds", run=LAGGING), 600)
    # The analysed runs keep up: their series are there, at 0, for alerts to watch.
    for name in ("passes", "fails"):
        assert _value(samples, "alphawatch_run_lag_checkpoints", run=name) == 0
        assert _value(samples, "alphawatch_run_lag_seconds", run=name) == 0
    # The queue counts only unclaimed jobs; the claimed one is the run's, not the queue's.
    assert _value(samples, "alphawatch_queue_depth") == 2
    oldest_queued = max(w for step, w in WAITED_S.items() if step != claimed)
    assert waited(_value(samples, "alphawatch_queue_oldest_seconds"), oldest_queued)
    for run in (listed[LAGGING], detail):
        assert run["lag_checkpoints"] == 3
        assert waited(run["lag_oldest_seconds"], 600)
        assert run["last_analysis_lag_seconds"] is None
        assert run["n_pending"] == 3
    # Run 1's latest analysis finished 300 s after its checkpoint was queued.
    assert listed["passes"]["last_analysis_lag_seconds"] == pytest.approx(max(STEPS))
    assert listed["passes"]["lag_checkpoints"] == 0
    assert listed["passes"]["lag_oldest_seconds"] is None
    assert client.get("/api/v1/runs/1").json()["last_analysis_lag_seconds"] == pytest.approx(
        max(STEPS)
    )


def test_an_empty_queue_has_no_age(client: TestClient) -> None:
    samples = _scrape(client)
    assert _value(samples, "alphawatch_queue_oldest_seconds") == 0
    assert _value(samples, "alphawatch_run_lag_seconds", run="passes") == 0


@pytest.mark.slow
def test_the_run_list_reads_the_lag_of_every_run_in_two_queries(
    client: TestClient, db_url: str
) -> None:
    settings = Settings(database_url=db_url)
    check = GateCheck(defaults=settings.gate, method="ww", thresholds=settings.trust, notify=False)
    for seed in range(3):
        _run(db_url, f"more-{seed}", seed + 10, check)
    _lagging_run(db_url)
    with _statements(db_url) as seen:
        listed = client.get("/api/v1/runs").json()["runs"]
    assert len(listed) == 6
    assert sum("coalesce(checkpoint.rewritten_at" in s.lower() for s in seen) == 2
