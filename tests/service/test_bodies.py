"""The long answers written from rows (service/api/bodies.py) are the response models' bytes.

Each body is compared, byte for byte, with what the validated path makes of the same answer as
dicts (the model's ``validate_python`` then ``dump_json``), on answers read from a real run
(kept statistics and statistics computed from layer rows, with NaN, infinities, missing
values and integer metrics), through the API as a client sees it, and on rows made to hold
what JSON writers disagree on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, TypeAdapter

from alphawatch.service import robust
from alphawatch.service.api import bodies, create_app, queries
from alphawatch.service.api.schemas import BlockTrendRead, HistoryRead, TrendPoint, TrendRead
from alphawatch.service.api.selections import BlockQuery, TrendQuery
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.trust import Thresholds
from tests.factories import KINDS, Row, analysed_run, layer_row

STEPS = (100, 200, 300, 400, 500)


def _layers(rng: np.random.Generator, step: int) -> list[Row]:
    rows = [layer_row("model.embed_tokens", kind="embed", block=None, alpha=4.0)]
    for block in range(3):
        for kind in KINDS:
            draw = rng.random()
            extra: dict[str, Any] = {}
            if draw < 0.2:
                extra = {"fit_status": "poor_fit", "trusted": False}
            elif draw < 0.3:
                extra = {"correlation_trap": True, "trusted": False}
            alpha: float | None = float(rng.uniform(1.5, 9.5))
            if draw > 0.93:
                alpha = None
            rows.append(
                layer_row(
                    f"model.layers.{block}.{kind}_proj",
                    kind=kind,
                    block=block,
                    alpha=alpha,
                    # What JSON cannot hold, and numbers whose shortest forms differ by writer.
                    D=[math.nan, 1e-5, 2.5e-7, 0.1, None][int(draw * 5)],
                    log_norm=[math.inf, -math.inf, 1e16, 123.456][int(draw * 4)],
                    stable_rank=float(rng.uniform(1, 50)),
                    num_pl_spikes=int(rng.integers(0, 90)) if draw < 0.9 else None,
                    **extra,
                )
            )
    if step == STEPS[1]:
        rows = [r for r in rows if r["block"] != 2]  # a block missing at one step
    return rows


@pytest.fixture
def run_url(db_url: str) -> str:
    rng = np.random.default_rng(5)
    analysed_run(db_url, name="bodies", steps=STEPS, layers=lambda s: _layers(rng, s))
    return db_url


def _validated(model: type[BaseModel], answer: dict[str, Any]) -> bytes:
    adapter = TypeAdapter(model)
    return adapter.dump_json(adapter.validate_python(answer))


TRENDS = [
    TrendQuery(),
    TrendQuery(stat="p90", filter="all", outliers="none"),
    TrendQuery(kind="q,k,v,o,qkv", stat="iqr"),
    TrendQuery(block_min=1, block_max=1),
    TrendQuery(block_min=0, block_max=1, stat="mean"),
    TrendQuery(metric="log_norm"),
    TrendQuery(metric="D", stat="trimmed_mean"),
    TrendQuery(metric="num_pl_spikes", max_points=3),
    TrendQuery(variant="exp_avg"),
]


@pytest.mark.parametrize("query", TRENDS, ids=lambda q: repr(q.model_dump(exclude_unset=True)))
def test_a_trend_body_is_the_models(run_url: str, query: TrendQuery) -> None:
    head = {
        "run_id": 1,
        "metric": query.metric,
        "stat": query.stat,
        "filter": query.filter,
        "method": "ww",
        "outliers": query.outliers,
        "variant": query.variant,
    }
    thresholds = Thresholds()
    with session_scope(make_engine(run_url, reads=True)) as session:
        args = {"session": session, "run_id": 1, "query": query, "method": "ww"}
        points = queries.trend(**args, thresholds=thresholds)
        rows = queries.trend_rows(**args, thresholds=thresholds)
    fast = bodies.with_list(TrendRead, head, "points", bodies.TREND_POINTS.points(rows))
    assert fast == _validated(TrendRead, {**head, "points": points})
    assert points, "an empty trend proves nothing"


@pytest.mark.parametrize(
    "query",
    [BlockQuery(), BlockQuery(order="block", stat="p10", filter="all"), BlockQuery(max_points=2)],
    ids=repr,
)
def test_a_block_trends_body_is_the_models(run_url: str, query: BlockQuery) -> None:
    head = {
        "run_id": 1,
        "metric": query.metric,
        "stat": query.stat,
        "filter": query.filter,
        "variant": query.variant,
        "order": query.order,
    }
    with session_scope(make_engine(run_url, reads=True)) as session:
        args = {"session": session, "run_id": 1, "query": query, "method": "ww"}
        rows = queries.block_trend_rows(**args, thresholds=Thresholds())
    blocks = [{"block": b, "points": [queries.trend_point(r) for r in of]} for b, of in rows]
    fast = bodies.with_list(BlockTrendRead, head, "blocks", bodies.block_trends(rows))
    assert fast == _validated(BlockTrendRead, {**head, "blocks": blocks})
    assert len(blocks) == 3


@pytest.mark.parametrize("metric", ["alpha", "D", "log_norm", "num_pl_spikes"])
def test_a_history_body_is_the_models(run_url: str, metric: str) -> None:
    args: dict[str, Any] = {
        "run_id": 1,
        "layer_name": "model.layers.2.q_proj",
        "metric": metric,
        "method": "ww",
        "max_points": None,
        "limit": None,
        "offset": 0,
    }
    with session_scope(make_engine(run_url, reads=True)) as session:
        rows = queries.layer_history_rows(session=session, **args)
    points = [dict(zip(queries.HISTORY_FIELDS, row, strict=True)) for row in rows]
    head = {"run_id": 1, "layer": "model.layers.2.q_proj", "metric": metric}
    fast = bodies.with_list(HistoryRead, head, "points", bodies.HISTORY_POINTS.points(rows))
    assert fast == _validated(HistoryRead, {**head, "points": points})
    assert len(points) == len(STEPS) - 1  # block 2 is missing at one step


@pytest.fixture
def client(run_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=run_url, api_cache_mb=0))) as c:
        yield c


def test_the_api_answers_the_models_bytes(client: TestClient, run_url: str) -> None:
    """What a client receives, for each of the three routes: the validated path's bytes."""
    got = client.get("/api/v1/runs/1/trend", params={"metric": "D", "stat": "p25"})
    assert got.status_code == 200
    with session_scope(make_engine(run_url, reads=True)) as session:
        query = TrendQuery(metric="D", stat="p25")
        points = queries.trend(
            session=session, run_id=1, query=query, method="ww", thresholds=Thresholds()
        )
    head = {
        "run_id": 1,
        "metric": "D",
        "stat": "p25",
        "filter": "trusted",
        "method": "ww",
        "outliers": query.outliers,
        "variant": "weight",
    }
    assert got.content == _validated(TrendRead, {**head, "points": points})
    # The other two: valid answers of their models, in the models' own form.
    blocks = client.get("/api/v1/runs/1/blocks")
    history = client.get("/api/v1/runs/1/layers/model.layers.0.up_proj/history?metric=log_norm")
    assert blocks.status_code == history.status_code == 200
    assert _validated(BlockTrendRead, blocks.json()) == blocks.content
    assert _validated(HistoryRead, history.json()) == history.content
    for missing in ("/api/v1/runs/9/trend", "/api/v1/runs/9/blocks"):
        assert client.get(missing).status_code == 404


def test_rows_that_json_writers_disagree_on() -> None:
    """Shortest forms, signed zero, NaN and infinities, text that needs escaping, counts as
    numpy integers or as the JSON text the kept rows hold."""
    stats = [1e-5, -0.0, math.nan, math.inf, -math.inf, 1e16, 2.5e-7, None]
    rows = [
        (0, 1e22, 3, 2, '{"poor_fit": 1, "alpha_gt_8": 1}', *stats),
        (2**53 + 1, None, 0, 0, {}, *[None] * 8),
        (7, 0.1, 1, 4, {"a,b": np.int64(4)}, *stats[::-1]),
        (8, 5e-324, 1, 1, '{"caf\\u00e9 \\"q\\"": 1}', *stats),
    ]
    points = [dict(zip(queries.TREND_FIELDS, row, strict=True)) for row in rows]
    for point in points:
        if isinstance(point["excluded"], str):
            point["excluded"] = TypeAdapter(dict[str, int]).validate_json(point["excluded"])
    adapter = TypeAdapter(list[TrendPoint])
    assert bodies.TREND_POINTS.points(rows) == adapter.dump_json(adapter.validate_python(points))
    assert bodies.TREND_POINTS.points([]) == b"[]"
    statuses = ["ok", 'a,"b"\n', "é\x01"]
    history = [(i, 1.5, None, math.nan, 3, s, i % 2 == 0) for i, s in enumerate(statuses)]
    expected = TypeAdapter(list[dict[str, Any]]).validate_python(
        [dict(zip(queries.HISTORY_FIELDS, row, strict=True)) for row in history]
    )
    model = TypeAdapter(HistoryRead)
    head = {"run_id": 1, "layer": "l", "metric": "alpha"}
    assert bodies.with_list(
        HistoryRead, head, "points", bodies.HISTORY_POINTS.points(history)
    ) == model.dump_json(model.validate_python({**head, "points": expected}))


def test_the_rows_are_in_the_models_field_order() -> None:
    assert (
        "step",
        "value",
        "n_used",
        "n_excluded",
        "excluded",
        *robust.STATS,
    ) == queries.TREND_FIELDS
    assert queries.HISTORY_FIELDS[:2] == ("step", "value")
    with pytest.raises(ValueError, match="last field"):
        bodies.with_list(TrendRead, {}, "run_id", b"[]")


def test_a_read_on_a_dropped_connection_is_a_database_error(pg_url: str) -> None:
    """The rows read straight from the driver fail as SQLAlchemy's own reads do: a connection
    the server dropped is an OperationalError (the API answers 503, not 500), and the next read
    works."""
    import psycopg
    from sqlalchemy import select
    from sqlalchemy.exc import OperationalError

    from alphawatch.service.db.models import Checkpoint

    analysed_run(
        pg_url, name="dropped", steps=(100,), layers=lambda s: _layers(np.random.default_rng(0), s)
    )
    engine = make_engine(pg_url, reads=True)
    statement = select(Checkpoint.id).where(Checkpoint.run_id == 1)
    with pytest.raises(OperationalError), session_scope(engine) as session:
        pid = session.connection().connection.driver_connection.info.backend_pid  # type: ignore[union-attr]
        with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql")) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        queries.rows_of(session, statement, {})
    with session_scope(engine) as session:
        assert [tuple(r) for r in queries.rows_of(session, statement, {})] == [(1,)]
