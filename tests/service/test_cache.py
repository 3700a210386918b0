"""The result cache: served while nothing changed, dropped on every committed write."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient

from alphawatch.service.api import create_app
from alphawatch.service.api.cache import ResultCache, libpq_url
from alphawatch.service.db import answers, queue, registry, results
from alphawatch.service.db.rows import LayerRow
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.trust import Thresholds
from tests.factories import random_run

TREND = "/api/v1/runs/1/trend"
HISTORY = "/api/v1/runs/1/layers/model.layers.0.q_proj/history"


@pytest.fixture
def client(pg_url: str) -> Iterator[TestClient]:
    random_run(pg_url)
    app = create_app(Settings(database_url=pg_url))
    with TestClient(app) as c:
        cache: ResultCache = app.state.cache
        assert cache.wait_live(10), "the cache listener did not connect"
        yield c


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def _cache(client: TestClient) -> ResultCache:
    cache: ResultCache = client.app.state.cache  # type: ignore[attr-defined]
    return cache


def test_repeated_reads_are_served_from_memory_with_the_same_body(client: TestClient) -> None:
    for path in (
        TREND,
        HISTORY,
        "/api/v1/runs/1/heatmap",
        "/api/v1/runs/1/flags",
        "/api/v1/compare?runs=1",
    ):
        first, second = client.get(path), client.get(path)
        assert first.status_code == second.status_code == 200, first.text
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert first.content == second.content
    # Other parameters are other answers, not the cached one.
    mean = client.get(TREND, params={"stat": "mean"})
    assert mean.headers["x-cache"] == "miss"
    assert mean.json()["stat"] == "mean"


def test_a_completed_checkpoint_is_visible_at_once(client: TestClient, pg_url: str) -> None:
    before = client.get(TREND).json()
    assert client.get(TREND).headers["x-cache"] == "hit"
    version = _cache(client).version()
    _complete_step(pg_url, 400, alpha=3.25)
    _until(lambda: _cache(client).version() != version)
    after = client.get(TREND)
    assert after.headers["x-cache"] == "miss"
    assert [p["step"] for p in after.json()["points"]] == [
        *(p["step"] for p in before["points"]),
        400,
    ]
    assert after.json()["points"][-1]["value"] == 3.25
    history = client.get(HISTORY).json()["points"]
    assert history[-1] == {**history[-1], "step": 400, "value": 3.25}


def test_a_deleted_run_is_not_served_from_memory(client: TestClient, pg_url: str) -> None:
    assert client.get(HISTORY).status_code == 200
    assert client.get(HISTORY).headers["x-cache"] == "hit"
    version = _cache(client).version()
    # Deleted behind the API's back, as another API process or an operator would.
    with psycopg.connect(libpq_url(pg_url), autocommit=True) as conn:
        conn.execute("DELETE FROM run WHERE id = 1")
    _until(lambda: _cache(client).version() != version)
    gone = client.get(HISTORY)
    assert gone.status_code == 404
    assert "run 1" in gone.json()["detail"]


def test_a_lost_listener_serves_nothing_until_it_is_back(client: TestClient, pg_url: str) -> None:
    assert client.get(TREND).headers["x-cache"] == "miss"
    assert client.get(TREND).headers["x-cache"] == "hit"
    cache = _cache(client)
    version = cache.version()
    with psycopg.connect(libpq_url(pg_url), autocommit=True) as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'alphawatch-cache' AND datname = current_database()"
        ).fetchone()
    assert killed == (1,)
    # Reconnected, and everything kept before the loss is gone: a notification may be missed.
    _until(lambda: cache.live and cache.version() not in (None, version))
    assert client.get(TREND).headers["x-cache"] == "miss"
    assert client.get(TREND).headers["x-cache"] == "hit"


def test_a_body_computed_across_a_change_is_never_stored(pg_url: str) -> None:
    cache = ResultCache(pg_url, max_bytes=64)
    cache.start()
    try:
        assert cache.wait_live(10)
        version = cache.version()
        with psycopg.connect(libpq_url(pg_url), autocommit=True) as conn:
            conn.execute("INSERT INTO run (name, path, created_at) VALUES ('x', '/x', now())")
        _until(lambda: cache.version() != version)
        cache.put("k", version, b"stale")  # computed before the write, finished after it
        assert cache.get("k") is None
        cache.put("k", cache.version(), b"fresh")
        assert cache.get("k") == b"fresh"
        cache.put("big", cache.version(), b"x" * 9)  # over an eighth of the budget: not kept
        assert cache.get("big") is None
        for i in range(16):  # 16 x 8 bytes in a 64-byte budget: least recently used go first
            cache.put(f"k{i}", cache.version(), b"v" * 8)
        assert cache.get("k") is None and cache.get("k7") is None
        assert all(cache.get(f"k{i}") == b"v" * 8 for i in range(8, 16))
    finally:
        cache.stop()
    assert not cache.live and cache.get("k15") is None


def test_sqlite_keeps_nothing(sqlite_url: str) -> None:
    random_run(sqlite_url)
    app = create_app(Settings(database_url=sqlite_url))
    assert app.state.cache is None
    with TestClient(app) as c:
        first, second = c.get(TREND), c.get(TREND)
    assert first.status_code == 200 and "x-cache" not in second.headers
    assert np.isfinite(second.json()["points"][-1]["value"])


def test_concurrent_misses_of_one_url_share_one_computation(client: TestClient) -> None:
    # Everything a dashboard fleet asks at once after a checkpoint lands: one computes, the
    # others wait for its body (or find it kept), and all get the same answer.
    path = TREND + "?block_min=0&block_max=1&outliers=mad"
    n = 12
    barrier = threading.Barrier(n)

    def ask(_: int) -> tuple[str, bytes]:
        barrier.wait()
        answer = client.get(path)
        assert answer.status_code == 200, answer.text
        return answer.headers["x-cache"], answer.content

    for _ in range(3):
        _cache(client).invalidate()
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(ask, range(n)))
        kinds = [kind for kind, _ in answers]
        assert kinds.count("miss") == 1, kinds
        assert set(kinds) <= {"miss", "waited", "hit"}
        assert len({body for _, body in answers}) == 1


def test_a_shared_failure_is_every_waiters_answer(client: TestClient) -> None:
    # The first asker's 404 is the answer of those who waited for it, not a 500.
    path = "/api/v1/runs/999/trend"
    barrier = threading.Barrier(6)

    def ask(_: int) -> int:
        barrier.wait()
        return client.get(path).status_code

    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(ask, range(6))) == {404}


def _complete_step(pg_url: str, step: int, *, alpha: float) -> None:
    """Register, claim and complete a checkpoint of run 1 at ``step``, as a worker would."""
    engine = make_engine(pg_url)
    with session_scope(engine) as session:
        registry.register_checkpoint(
            session, run_id=1, step=step, path=f"/r/{step}", fingerprint="y", fmt="hf"
        )
    with session_scope(engine) as session:
        job = queue.claim(session, worker_id="w", lease_s=60)
    assert job is not None and job.step == step
    layers = [
        LayerRow(
            name="model.layers.0.q_proj",
            kind="q",
            block=0,
            method="ww",
            fit_status="ok",
            correlation_trap=False,
            rank_collapse=False,
            trusted=True,
            alpha=alpha,
            D=0.05,
            num_pl_spikes=20,
        )
    ]
    with session_scope(engine) as session:
        assert results.complete(
            session,
            job_id=job.job_id,
            worker_id="w",
            layers=layers,
            spectra=[],
            device="cpu",
            elapsed_s=0.1,
            thresholds=Thresholds(),
        )


def _settle(pg_url: str, *caches: ResultCache) -> None:
    """Send a notification after everything committed so far, and wait until every cache heard
    it last (they then share one token)."""
    marker = f"marker:{time.monotonic_ns()}"
    with psycopg.connect(libpq_url(pg_url), autocommit=True) as conn:
        conn.execute("SELECT pg_notify('alphawatch_results', %s)", (marker,))
    _until(lambda: all(cache.token() == marker for cache in caches))


def test_api_processes_share_answers_until_the_results_change(pg_url: str) -> None:
    """What one API process computed is the other's answer, under the same last notification;
    after a write neither serves the old answer, and the old one is pruned from the table."""
    random_run(pg_url)
    one = TestClient(create_app(Settings(database_url=pg_url)))
    other = TestClient(create_app(Settings(database_url=pg_url)))
    with one, other:
        first, second = _cache(one), _cache(other)
        assert first.wait_live(10) and second.wait_live(10)
        # Both heard the same last notification: one sent after every other.
        _settle(pg_url, first, second)
        computed = one.get(TREND)
        assert computed.headers["x-cache"] == "miss"
        shared = other.get(TREND)
        assert shared.headers["x-cache"] == "peer"
        assert shared.content == computed.content
        assert other.get(TREND).headers["x-cache"] == "hit"
        token = first.token()

        _complete_step(pg_url, 400, alpha=3.25)
        _settle(pg_url, first, second)
        assert first.token() != token
        fresh = other.get(TREND)
        assert fresh.headers["x-cache"] == "miss"
        assert fresh.json()["points"][-1] == {**fresh.json()["points"][-1], "step": 400}
        again = one.get(TREND)
        assert again.headers["x-cache"] == "peer"
        assert again.content == fresh.content

        # Only answers under the token now heard are left in the table.
        def tokens() -> set[str]:
            with psycopg.connect(libpq_url(pg_url), autocommit=True) as conn:
                return {t for (t,) in conn.execute("SELECT token FROM api_answer")}

        _until(lambda: tokens() == {first.token()})


def test_an_answer_of_another_token_is_never_served(pg_url: str) -> None:
    random_run(pg_url)
    with TestClient(create_app(Settings(database_url=pg_url))) as client:
        cache = _cache(client)
        assert cache.wait_live(10)
        _until(lambda: cache.token() is not None)
        # A row kept under a token this process has not heard (a process behind or ahead).
        with psycopg.connect(libpq_url(pg_url), autocommit=True) as conn:
            conn.execute(
                "INSERT INTO api_answer (key, token, body) VALUES (%s, %s, %s)",
                (answers._row_key(f"{TREND}?[]"), "elsewhere:1", b'{"forged": true}'),
            )
        answer = client.get(TREND)
        assert answer.headers["x-cache"] == "miss"
        assert "forged" not in answer.text


def test_each_process_keeps_at_most_its_budget_in_the_shared_tier() -> None:
    cache = ResultCache("postgresql+psycopg://u@127.0.0.1/db", max_bytes=800)
    cache.invalidate("checkpoint:7")
    assert [cache.may_share("checkpoint:7", 100) for _ in range(9)] == [True] * 8 + [False]
    assert not cache.may_share("checkpoint:6", 10)  # made under a token no longer heard
    cache.invalidate("checkpoint:8")
    assert not cache.may_share("checkpoint:8", 101)  # larger than this process would keep
    assert cache.may_share("checkpoint:8", 100)  # a new token, a new budget
    cache.invalidate()  # a write of this process: unknown until its notification is heard
    assert not cache.may_share("checkpoint:8", 1)
