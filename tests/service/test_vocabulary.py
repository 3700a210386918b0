"""One vocabulary: what GET /vocabulary serves is what every route, the precomputed rows and the
checkpoint reader use, and nothing else declares its own list."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from alphawatch import vocabulary as words
from alphawatch.service import robust
from alphawatch.service.api import create_app
from alphawatch.service.db import aggregates
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import create_token
from alphawatch.settings import Settings
from alphawatch.workers.checkpoints.naming import classify
from tests.factories import random_run


@pytest.fixture
def client(sqlite_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=sqlite_url))) as c:
        yield c


def _query_enum(openapi: dict[str, Any], path: str, name: str) -> tuple[list[str], str]:
    """Values and default of a query parameter as the OpenAPI schema publishes them."""
    schemas = openapi["components"]["schemas"]
    param = next(p for p in openapi["paths"][path]["get"]["parameters"] if p["name"] == name)
    schema = param["schema"]
    default = schema.get("default")
    # An optional parameter (the gate's, whose default is the run's gate rules): its non-null arm.
    schema = next((s for s in schema.get("anyOf", []) if s.get("type") != "null"), schema)
    if "$ref" in schema:
        schema = {**schemas[schema["$ref"].rsplit("/", 1)[1]], **schema}
    return schema["enum"], schema.get("default", default)


def test_served_vocabulary_is_the_single_definition(client: TestClient) -> None:
    body = client.get("/api/v1/vocabulary").json()
    assert [s["name"] for s in body["statistics"]] == [s.value for s in words.Statistic]
    assert [s["name"] for s in body["statistics"] if not s["level"]] == ["iqr"]
    assert [f["name"] for f in body["filters"]] == ["trusted", "all"]
    assert [r["name"] for r in body["outlier_rules"]] == ["none", "mad"]
    assert body["kinds"] == [k.value for k in words.KIND_ORDER]
    assert {g["name"]: g["kinds"] for g in body["kind_groups"]} == {
        "attention": ["q", "k", "v", "qkv", "o"],
        "mlp": ["gate", "up", "down", "fc_in", "fc_out"],
        "embeddings": ["embed", "lm_head"],
    }
    for terms in (body["statistics"], body["filters"], body["outlier_rules"]):
        assert sum(t["default"] for t in terms) == 1
        assert all(t["label"] for t in terms)


def test_routes_accept_exactly_the_served_names_with_the_served_defaults(
    client: TestClient,
) -> None:
    body = client.get("/api/v1/vocabulary").json()
    openapi = client.get("/openapi.json").json()

    def served(key: str) -> tuple[list[str], str]:
        terms = body[key]
        return [t["name"] for t in terms], next(t["name"] for t in terms if t["default"])

    for path in ("/api/v1/runs/{run_id}/trend", "/api/v1/compare"):
        assert _query_enum(openapi, path, "filter") == served("filters")
    # The gate's stat and filter default to the run's gate rules, whose server defaults
    # (Settings.gate, alphawatch.gate_rules) are the served defaults.
    gate_filters, no_default = _query_enum(openapi, "/api/v1/runs/{run_id}/gate", "filter")
    assert (gate_filters, no_default) == (served("filters")[0], None)
    gate = Settings().gate
    assert (gate.stat, gate.filter) == (served("statistics")[1], served("filters")[1])
    for path in ("/api/v1/runs/{run_id}/trend", "/api/v1/compare"):
        assert _query_enum(openapi, path, "stat") == served("statistics")
    # The gate bands a level of alpha: it offers the levels only, under the same default.
    levels = [t["name"] for t in body["statistics"] if t["level"]]
    assert _query_enum(openapi, "/api/v1/runs/{run_id}/gate", "stat") == (levels, None)
    assert _query_enum(openapi, "/api/v1/runs/{run_id}/trend", "outliers") == served(
        "outlier_rules"
    )
    # The robust module computes each served statistic, under the same names.
    assert tuple(served("statistics")[0]) == robust.STATS
    assert tuple(served("filters")[0]) == aggregates.PRECOMPUTED_FILTERS
    assert tuple(served("outlier_rules")[0]) == aggregates.PRECOMPUTED_OUTLIERS
    # Kept: every layer, each served kind group and each served kind alone.
    assert {aggregates.kinds_key(g["kinds"]) for g in body["kind_groups"]} | {""} | set(
        body["kinds"]
    ) == aggregates.PRECOMPUTED_KINDS


def test_every_served_statistic_answers_and_the_gate_refuses_a_spread(sqlite_url: str) -> None:
    random_run(sqlite_url)
    with TestClient(create_app(Settings(database_url=sqlite_url))) as c:
        body = c.get("/api/v1/vocabulary").json()
        for term in body["statistics"]:
            trend = c.get("/api/v1/runs/1/trend", params={"stat": term["name"]})
            assert trend.status_code == 200, trend.text
            points = trend.json()["points"]
            assert [p["value"] for p in points] == [p[term["name"]] for p in points]
            gate = c.get("/api/v1/runs/1/gate", params={"stat": term["name"]})
            if term["level"]:
                assert gate.status_code == 200, gate.text
            else:
                assert gate.status_code == 422
                assert "stat" in gate.json()["detail"] and "median" in gate.json()["detail"]
        for group in body["kind_groups"]:
            grouped = c.get(
                "/api/v1/runs/1/trend", params={"kind": ",".join(group["kinds"]), "filter": "all"}
            ).json()
            used = [p["n_used"] + p["n_excluded"] for p in grouped["points"]]
            # The filled run has 4 blocks of q, k, v, o, gate, up, down.
            assert used == [{"attention": 16, "mlp": 12, "embeddings": 0}[group["name"]]] * 3


def test_checkpoint_reader_names_only_served_kinds(client: TestClient) -> None:
    served = client.get("/api/v1/vocabulary").json()["kinds"]
    names = [
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "h.0.attn.c_attn",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "h.0.mlp.c_fc",
        "h.0.mlp.c_proj",
        "model.layers.0.q_proj.lora_update",
        "lm_head",
        "conv.stem",
    ]
    kinds = [classify(name)[0] for name in names]
    assert all(type(k) is str for k in kinds)  # plain strings reach the database
    assert set(kinds) == set(served)


def test_vocabulary_is_public_on_a_token_protected_server(sqlite_url: str) -> None:
    with session_scope(make_engine(sqlite_url)) as session:
        create_token(session, name="t")
    settings = Settings(database_url=sqlite_url, read_requires_token=True)
    with TestClient(create_app(settings)) as c:
        assert c.get("/api/v1/runs").status_code == 401
        assert c.get("/api/v1/vocabulary").status_code == 200


def test_every_statistic_has_its_column_and_its_trend_field() -> None:
    from alphawatch.service.api.schemas import TrendPoint
    from alphawatch.service.db.models import CheckpointStat

    names = {s.value for s in words.Statistic}
    assert names <= set(TrendPoint.model_fields)
    assert names <= set(CheckpointStat.__table__.columns.keys())
    assert set(robust.describe(np.arange(5.0))) == names
