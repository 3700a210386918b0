"""Layer rows read as arrays (PostgreSQL) hold exactly what they hold read as tuples.

Trends that no kept statistic answers (block ranges, other kind sets, other variants) read
their layer rows' columns. On PostgreSQL they come back as one row of arrays with the reason
fields packed into one integer per row; the rules must then see the very rows, values and
reasons that a tuple per row gives: every fit status, each flag, values missing, NaN and
infinite, integer metrics, layers outside any block, and a fit status this version does not
know (read as tuples instead).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from alphawatch.service.api import create_app, queries
from alphawatch.service.db.layers import LayerSelection
from alphawatch.service.db.models import Checkpoint, LayerMetric
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.vocabulary import FitStatus
from tests.factories import KINDS, Row, analysed_run, layer_row, register_run

STEPS = (10, 20, 30)
ODD_ALPHAS = (None, float("nan"), float("inf"), -float("inf"), 9.5, 8.0, 2.0)


def _layers(step: int) -> list[Row]:
    rng = np.random.default_rng(step)
    statuses = [s.value for s in FitStatus]
    rows = [
        layer_row("model.embed_tokens", kind="embed", block=None, alpha=4.0),
        layer_row("lm_head", kind="lm_head", block=None, alpha=None, fit_status="failed"),
    ]
    for block in range(4):
        for i, kind in enumerate(KINDS):
            n = block * len(KINDS) + i
            alpha = ODD_ALPHAS[n % len(ODD_ALPHAS)] if n % 3 == 0 else float(rng.uniform(1, 9))
            rows.append(
                layer_row(
                    f"model.layers.{block}.{kind}_proj",
                    kind=kind,
                    block=block,
                    alpha=alpha,
                    fit_status=statuses[n % len(statuses)],
                    trusted=bool(rng.random() < 0.7),
                    correlation_trap=bool(rng.random() < 0.2),
                    rank_collapse=bool(rng.random() < 0.2),
                    num_pl_spikes=int(rng.integers(0, 50)) if n % 4 else None,
                    stable_rank=float(rng.uniform(1, 30)) if n % 5 else None,
                )
            )
    return rows


@pytest.fixture
def pg_run(pg_url: str) -> Iterator[tuple[str, list[int]]]:
    analysed_run(pg_url, name="columns", steps=STEPS, layers=_layers)
    with session_scope(make_engine(pg_url)) as session:
        ids = [
            int(i)
            for i in session.scalars(Checkpoint.__table__.select().with_only_columns(Checkpoint.id))
        ]
    yield pg_url, ids


def _rows(columns: queries.LayerColumns, by_block: bool, by_layer: bool) -> list[tuple[Any, ...]]:
    # The rows as comparable tuples (values by their bits: NaN equals NaN, -0.0 differs from 0.0),
    # sorted: two reads of one table need not return rows in one order.
    bits = lambda a: a.view(np.int64).tolist()  # noqa: E731
    return sorted(
        zip(
            columns.ids.tolist(),
            columns.blocks.tolist() if by_block else [None] * columns.ids.size,
            bits(columns.values),
            bits(columns.alpha),
            [str(r) for r in columns.reasons.tolist()],
            [columns.names[i] for i in columns.layers.tolist()]
            if by_layer
            else [None] * columns.ids.size,
            strict=True,
        )
    )


@pytest.mark.parametrize("metric", ["alpha", "stable_rank", "num_pl_spikes", "change_ref_step"])
@pytest.mark.parametrize(("by_block", "by_layer"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize(
    "selection",
    [
        {},
        {"block_min": 1, "block_max": 2},
        {"kinds": ("q", "k", "v", "o", "embed")},
        {"block_min": 99, "block_max": 99},
    ],
)
def test_arrays_hold_what_tuples_hold(
    pg_run: tuple[str, list[int]],
    metric: str,
    by_block: bool,
    by_layer: bool,
    selection: dict[str, Any],
) -> None:
    url, ids = pg_run
    layers = LayerSelection(method="ww", variant="weight", **selection)
    where = [*layers.where()] + ([LayerMetric.block.is_not(None)] if by_block else [])
    shape = {"metric": metric, "by_block": by_block, "by_layer": by_layer}
    with Session(make_engine(url)) as session:
        arrays = queries._layer_arrays(session, ids, where, **shape)
        tuples = queries._tuple_columns(session, ids, where, **shape)
    assert arrays is not None
    assert _rows(arrays, by_block, by_layer) == _rows(tuples, by_block, by_layer)
    if by_layer:
        assert sorted(arrays.names) == sorted(tuples.names)
        assert len(set(arrays.names)) == len(arrays.names) == len(set(arrays.layers.tolist()))
    if selection.get("block_min") == 99:
        assert arrays.ids.size == 0
    else:
        # About something: odd values, untrusted reasons of several kinds, all checkpoints.
        assert set(arrays.ids.tolist()) == set(ids)
        assert len(set(arrays.reasons.tolist())) >= 4
        assert np.isnan(arrays.alpha).any() and np.isinf(arrays.alpha).any()


def test_an_unknown_fit_status_is_read_as_tuples(pg_run: tuple[str, list[int]]) -> None:
    url, ids = pg_run
    with session_scope(make_engine(url)) as session:
        session.execute(
            update(LayerMetric)
            .where(LayerMetric.name == "model.layers.1.q_proj", LayerMetric.checkpoint_id == ids[0])
            .values(fit_status="from_a_newer_worker", alpha=3.0)
        )
    layers = LayerSelection(method="ww", variant="weight", block_min=0, block_max=3)
    with Session(make_engine(url)) as session:
        where = layers.where()
        for by_layer in (False, True):
            found = queries._layer_arrays(
                session, ids, where, metric="alpha", by_block=False, by_layer=by_layer
            )
            assert found is None
    with TestClient(create_app(Settings(database_url=url, api_cache_mb=0))) as client:
        got = client.get("/api/v1/runs/1/trend", params={"block_min": 0, "block_max": 3})
        heat = client.get("/api/v1/runs/1/heatmap").json()
    assert got.status_code == 200, got.text
    first = got.json()["points"][0]
    assert first["excluded"].get("from_a_newer_worker") == 1
    # The heatmap reads the rows as tuples too: that one cell untrusted, its value shown.
    cell = heat["layers"].index("model.layers.1.q_proj"), heat["steps"].index(STEPS[0])
    assert heat["trusted"][cell[0]][cell[1]] is False
    assert heat["z"][cell[0]][cell[1]] == 3.0


def test_a_run_with_nothing_analysed_and_cells_without_values(db_url: str) -> None:
    # Edges of both reads: a run with only pending checkpoints (no rows at all, the arrays'
    # aggregate is null), and cells whose value is missing or NaN (null in the answer, their
    # verdict kept), a layer outside any block, on either database.
    analysed_run(
        db_url,
        name="done",
        steps=[5],
        layers=lambda s: [
            layer_row("a", alpha=float("nan")),
            layer_row("b", alpha=None, block=None, kind="embed"),
        ],
    )
    register_run(db_url, name="pending", steps=[1, 2])
    with TestClient(create_app(Settings(database_url=db_url, api_cache_mb=0))) as client:
        ids = {r["name"]: r["id"] for r in client.get("/api/v1/runs").json()["runs"]}
        for params in ({}, {"block_min": 0, "block_max": 3}, {"kind": "q"}):
            heat = client.get(f"/api/v1/runs/{ids['pending']}/heatmap", params=params).json()
            assert heat["z"] == [] and heat["layers"] == [] and heat["steps"] == []
            trend = client.get(f"/api/v1/runs/{ids['pending']}/trend", params=params).json()
            assert trend["points"] == []
        heat = client.get(f"/api/v1/runs/{ids['done']}/heatmap").json()
        trend = client.get(
            f"/api/v1/runs/{ids['done']}/trend", params={"block_min": 0, "block_max": 0}
        ).json()
    assert heat["layers"] == ["b", "a"] and heat["blocks"] == [None, 0]
    assert heat["z"] == [[None], [None]] and heat["trusted"] == [[True], [True]]
    assert trend["points"][0]["n_used"] == 0
    assert trend["points"][0]["excluded"] == {"no_value": 1}
