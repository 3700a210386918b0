"""Per-block statistics kept at write time answer exactly as the layer rows do.

The run mixes what makes a statistic hard: untrusted layers (poor fits, traps, rank collapse),
alpha above alpha_max, a value missing, MAD outliers, layers outside any block, gradient and
nested-width variants, and a second fit method, each with alphas of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select, update

from alembic import command
from alphawatch.service.api import create_app
from alphawatch.service.db import queue
from alphawatch.service.db.aggregates import PRECOMPUTED_SINGLE_KINDS, block_stat_rows
from alphawatch.service.db.migrations import alembic_config, upgrade
from alphawatch.service.db.models import BlockStat, Checkpoint, CheckpointStat, LayerMetric
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.trust import Thresholds
from tests.factories import KINDS, Row, analysed_run, complete_next, layer_row

STEPS = (100, 200, 300, 400)
BLOCKS = 5
STATS = ("median", "mean", "trimmed_mean", "p10", "p25", "p75", "p90", "iqr")


def _layers(rng: np.random.Generator, method: str) -> list[Row]:
    shift = 0.0 if method == "ww" else 1.0
    out = [
        layer_row("model.embed_tokens", kind="embed", block=None, alpha=4.0, method=method),
        layer_row("lm_head", kind="lm_head", block=None, alpha=5.0, method=method),
    ]
    for suffix, low in (("", 2.0), ("@exp_avg", 4.0), ("@w64", 5.0)):
        for block in range(BLOCKS):
            for kind in KINDS:
                if suffix == "@w64" and kind not in ("gate", "up", "down"):
                    continue
                extra: dict[str, Any] = {}
                draw = rng.random()
                if draw < 0.15:
                    extra = {"fit_status": "poor_fit", "trusted": False}
                elif draw < 0.2:
                    extra = {"correlation_trap": True, "trusted": False}
                elif draw < 0.25:
                    extra = {"rank_collapse": True, "trusted": False}
                alpha: float | None = float(rng.uniform(low, low + 1.5)) + shift
                if draw > 0.95:
                    alpha = float(rng.uniform(8.5, 12))  # above alpha_max
                elif draw > 0.9:
                    alpha = low + 60.0 if block % 2 else None  # a MAD outlier, or no value
                out.append(
                    layer_row(
                        f"model.layers.{block}.{kind}_proj{suffix}",
                        kind=kind,
                        block=block,
                        alpha=alpha,
                        method=method,
                        **extra,
                    )
                )
    return out


def _both_methods(rng: np.random.Generator, step: int) -> list[Row]:
    # The last block is missing at the first step: a block that appears later in the run.
    rows = _layers(rng, "ww") + _layers(rng, "ks2")
    if step == STEPS[0]:
        rows = [r for r in rows if r["block"] != BLOCKS - 1]
    return rows


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    rng = np.random.default_rng(11)
    analysed_run(db_url, name="blocks", steps=STEPS, layers=lambda s: _both_methods(rng, s))
    with TestClient(create_app(Settings(database_url=db_url))) as c:
        yield c


QUERIES: list[dict[str, str]] = [
    {"filter": flt, "outliers": outliers, "kind": kind, "variant": variant, "stat": stat}
    for flt in ("trusted", "all")
    for outliers in ("none", "mad")
    for kind, stat in (("", "median"), ("q,k,v,o,qkv", "p90"), ("gate,up,down,fc_in,fc_out", "iqr"))
    for variant in ("weight", "exp_avg", "w64")
]


def _answers(client: TestClient) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, q in enumerate(QUERIES):
        # Every selection under the default method; the other method on a few.
        for method in ("ww", "ks2") if i % 5 == 0 else ("ww",):
            params = {**q, "method": method}
            got = client.get("/api/v1/runs/1/blocks", params=params)
            assert got.status_code == 200, got.text
            out[f"blocks {params}"] = got.json()
            for block in (0, BLOCKS - 1, 99) if i % 3 == 0 else (1,):
                one = {**params, "block_min": str(block), "block_max": str(block)}
                got = client.get("/api/v1/runs/1/trend", params=one)
                assert got.status_code == 200, got.text
                out[f"trend {one}"] = got.json()
    return out


def _kept_rows(url: str) -> int:
    with session_scope(make_engine(url)) as session:
        return int(session.scalar(select(func.count()).select_from(BlockStat)) or 0)


def test_kept_block_statistics_equal_those_of_the_layer_rows(
    client: TestClient, db_url: str
) -> None:
    assert _kept_rows(db_url) > 0
    kept = _answers(client)
    with session_scope(make_engine(db_url)) as session:
        session.execute(delete(BlockStat))
    computed = _answers(client)
    assert kept.keys() == computed.keys()
    for key, answer in kept.items():
        assert answer == computed[key], key
    # The answers are about something: blocks listed, the last one only from the 2nd step,
    # gradients and nested widths in ranges of their own, methods apart.
    blocks = kept[f"blocks { ({**QUERIES[0], 'method': 'ww'}) }"]["blocks"]
    assert [b["block"] for b in blocks] == list(range(BLOCKS))[::-1]
    assert blocks[0]["points"][0]["n_used"] == 0 and blocks[0]["points"][1]["n_used"] > 0

    def median_of(q: dict[str, str], method: str) -> float:
        points = [
            p for b in kept[f"blocks { ({**q, 'method': method}) }"]["blocks"] for p in b["points"]
        ]
        return float(np.median([p["median"] for p in points if p["median"] is not None]))

    weight, exp_avg, w64 = QUERIES[:3]
    assert 2 < median_of(weight, "ww") < 3.5 < median_of(weight, "ks2") < 4.5
    assert 4 < median_of(exp_avg, "ww") < 5.5 and 5 < median_of(w64, "ww") < 6.5


def test_kept_rows_are_what_the_answers_are_read_from(db_url: str) -> None:
    rng = np.random.default_rng(11)
    analysed_run(db_url, name="blocks", steps=STEPS, layers=lambda s: _both_methods(rng, s))
    # No result cache: the rows are changed behind the API's back, and the question is which
    # rows an answer is computed from (the cache's NOTIFY would arrive asynchronously).
    with TestClient(create_app(Settings(database_url=db_url, api_cache_mb=0))) as client:
        _answers_follow_the_kept_rows(client, db_url)


def _answers_follow_the_kept_rows(client: TestClient, db_url: str) -> None:
    with session_scope(make_engine(db_url)) as session:
        session.execute(update(BlockStat).values(median=-1.0))
    blocks = client.get("/api/v1/runs/1/blocks").json()["blocks"]
    assert {p["value"] for b in blocks for p in b["points"] if p["n_used"]} == {-1.0}
    trend = client.get("/api/v1/runs/1/trend", params={"block_min": 2, "block_max": 2}).json()
    assert {p["value"] for p in trend["points"]} == {-1.0}
    # Rows made under other thresholds are not served: those points come from the layer rows.
    with session_scope(make_engine(db_url)) as session:
        session.execute(update(BlockStat).values(alpha_max=7.0))
    trend = client.get("/api/v1/runs/1/trend", params={"block_min": 2, "block_max": 2}).json()
    assert all(p["value"] > 1 for p in trend["points"])


def test_reanalysis_replaces_and_deletion_removes_the_kept_rows(db_url: str) -> None:
    rng = np.random.default_rng(3)
    analysed_run(db_url, name="blocks", steps=(100,), layers=lambda s: _layers(rng, "ww"))
    before = _kept_rows(db_url)
    with session_scope(make_engine(db_url)) as session:
        assert queue.reanalyze(session, run_id=1) == 1
    # Analysed again with one block fewer: its rows go with it.
    complete_next(db_url, layers=lambda s: [r for r in _layers(rng, "ww") if r["block"] != 0])
    after = _kept_rows(db_url)
    assert 0 < after < before
    with session_scope(make_engine(db_url)) as session:
        assert session.scalar(select(func.min(BlockStat.block))) == 1
        session.execute(delete(Checkpoint))
    assert _kept_rows(db_url) == 0


def _stored(url: str) -> list[tuple[Any, ...]]:
    columns = [c for c in BlockStat.__table__.columns if c.name != "id"]
    with session_scope(make_engine(url)) as session:
        return sorted(tuple(r) for r in session.execute(select(*columns)).all())


def test_the_migration_fills_block_statistics_from_the_layer_rows(db_url: str) -> None:
    rng = np.random.default_rng(5)
    analysed_run(db_url, name="blocks", steps=STEPS, layers=lambda s: _both_methods(rng, s))
    written = _stored(db_url)
    assert written
    with make_engine(db_url).begin() as connection:
        config = alembic_config(db_url)
        config.attributes["connection"] = connection
        command.downgrade(config, "0011")
    upgrade(db_url)
    assert _stored(db_url) == written
    # The same rows as block_stat_rows makes from the stored layer rows.
    with session_scope(make_engine(db_url)) as session:
        layers = [
            dict(r._mapping)
            for r in session.execute(
                select(
                    LayerMetric.checkpoint_id,
                    LayerMetric.name,
                    LayerMetric.kind,
                    LayerMetric.block,
                    LayerMetric.method,
                    LayerMetric.alpha,
                    LayerMetric.fit_status,
                    LayerMetric.trusted,
                    LayerMetric.correlation_trap,
                    LayerMetric.rank_collapse,
                ).where(LayerMetric.checkpoint_id == 1)
            )
        ]
    made = block_stat_rows(layers, checkpoint_id=1, thresholds=Thresholds())
    assert len(made) == sum(1 for r in written if r[0] == 1)


def _single_kind_stats(url: str) -> list[tuple[Any, ...]]:
    lead = ("checkpoint_id", "method", "kinds", "alpha_max", "median")
    rest = [c for c in CheckpointStat.__table__.columns if c.name not in ("id", *lead)]
    columns = [*(CheckpointStat.__table__.c[name] for name in lead), *rest]
    with session_scope(make_engine(url)) as session:
        return sorted(
            (
                tuple(r)
                for r in session.execute(
                    select(*columns).where(CheckpointStat.kinds.in_(PRECOMPUTED_SINGLE_KINDS))
                ).all()
            ),
            key=repr,
        )


def test_the_migration_fills_single_kind_statistics_of_earlier_checkpoints(db_url: str) -> None:
    """Checkpoints analysed before alpha of each kind alone was kept get it from their layer rows,
    as the worker makes it, under the thresholds their other statistics were made with."""
    rng = np.random.default_rng(7)
    analysed_run(db_url, name="kinds", steps=STEPS, layers=lambda s: _both_methods(rng, s))
    written = _single_kind_stats(db_url)
    # Every kind of the run, both methods, every checkpoint.
    assert {(r[0], r[1], r[2]) for r in written} == {
        (c, m, k)
        for c in range(1, len(STEPS) + 1)
        for m in ("ww", "ks2")
        for k in (*KINDS, "embed", "lm_head")
    }
    single = CheckpointStat.kinds.in_(PRECOMPUTED_SINGLE_KINDS)
    with session_scope(make_engine(db_url)) as session:
        # Checkpoints 1 and 2 as analysed before; 2 under a stricter alpha_max; 3 has its rows.
        session.execute(delete(CheckpointStat).where(single, CheckpointStat.checkpoint_id < 3))
        session.execute(
            update(CheckpointStat).where(CheckpointStat.checkpoint_id == 2).values(alpha_max=4.5)
        )
        session.execute(
            update(CheckpointStat)
            .where(single, CheckpointStat.checkpoint_id == 3)
            .values(median=-1.0)
        )
    with make_engine(db_url).begin() as connection:
        config = alembic_config(db_url)
        config.attributes["connection"] = connection
        command.downgrade(config, "0016")
    upgrade(db_url)
    filled = _single_kind_stats(db_url)
    assert [r for r in filled if r[0] == 1] == [r for r in written if r[0] == 1]
    assert {r[3] for r in filled if r[0] == 2} == {4.5}
    assert [r for r in filled if r[0] == 2] != [r for r in written if r[0] == 2]
    # A checkpoint that had its rows keeps them as they were: nothing is written twice.
    assert len(filled) == len(written)
    assert all(r in filled for r in written if r[0] == 4)
    assert {r[4] for r in filled if r[0] == 3} == {-1.0}
