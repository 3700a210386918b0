"""Each seam of the service says its thing once: errors and their codes, the layer filter, the
step range, statuses, and the query models the routes hand whole to their queries."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select

from alphawatch import vocabulary
from alphawatch.service.api import create_app, errors, queries
from alphawatch.service.db.models import LayerMetric
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from tests.factories import random_run

ROOT = Path(__file__).resolve().parents[2]


def _source(*folders: str) -> Iterator[tuple[Path, str]]:
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, path.read_text()


def _domain_errors() -> list[type[errors.ApiError]]:
    found: list[type[errors.ApiError]] = []
    todo = [errors.ApiError]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def test_every_domain_error_is_answered_with_its_own_code_by_one_handler(sqlite_url: str) -> None:
    app = create_app(Settings(database_url=sqlite_url, api_cache_mb=0))
    mapped = [
        e for e in app.exception_handlers if isinstance(e, type) and issubclass(e, errors.ApiError)
    ]
    assert mapped == [errors.ApiError]
    raising = APIRouter()
    kinds = {error.__name__: error for error in _domain_errors()}
    assert {"NotFound", "Conflict", "Refused", "Invalid", "Unauthenticated"} <= set(kinds)

    @raising.get("/raise/{name}")
    def raise_it(name: str) -> None:
        raise kinds[name](f"{name} raised")

    app.include_router(raising)
    with TestClient(app) as client:
        for name, error in kinds.items():
            answer = client.get(f"/raise/{name}")
            assert answer.status_code == error.status
            assert answer.json() == {"detail": f"{name} raised"}
            assert answer.headers.get("www-authenticate") == (error.headers or {}).get(
                "WWW-Authenticate"
            )
            # Every code a domain error answers is one the schema can document.
            assert errors.documented(error.status)


def test_no_route_or_dependency_raises_an_http_exception() -> None:
    for path, text in _source("service/api"):
        if path.name == "guard.py":
            continue  # the body limit is raised inside Starlette's body read, not a route
        assert "HTTPException(" not in text, f"{path}: raise a domain error of errors.py"


def test_the_step_range_is_declared_once_in_the_vocabulary() -> None:
    pattern = re.compile(r"2\s*\*\*\s*63|9223372036854775807|9_223_372_036_854_775_807")
    for path, text in _source("service", "alphawatch", "workers"):
        if path.resolve() == (ROOT / "alphawatch" / "vocabulary.py").resolve():
            continue
        assert not pattern.search(text), f"{path}: use alphawatch.vocabulary.MAX_STEP"
    assert vocabulary.MAX_STEP == 2**63 - 1  # PostgreSQL's BIGINT


def test_step_paths_and_queries_stop_at_max_step(sqlite_url: str) -> None:
    random_run(sqlite_url)
    with TestClient(create_app(Settings(database_url=sqlite_url, api_cache_mb=0))) as client:
        top, over = vocabulary.MAX_STEP, vocabulary.MAX_STEP + 1
        assert client.get(f"/api/v1/runs/1/checkpoints/{top}/layers").status_code == 404
        assert client.get(f"/api/v1/runs/1/checkpoints/{over}/layers").status_code == 422
        assert client.get(f"/api/v1/runs/1/gate?step={over}").status_code == 422
        assert client.get(f"/api/v1/runs/1/alerts?offset={over}").status_code == 422


def test_queries_and_runs_name_statuses_by_their_enums() -> None:
    bare = re.compile(
        r"""["'](done|failed|pending|queued|running|vanished|sending|delivered|"""
        r"""superseded)["']"""
    )
    for name in ("queries.py", "runs.py"):
        text = (ROOT / "service" / "api" / name).read_text()
        assert not bare.findall(text), f"service/api/{name}: use the enums of db/models.py"


def test_the_layer_filter_is_built_in_one_place() -> None:
    built = re.compile(r"LayerMetric\.(kind\.in_|block\s*[<>]=)|of_variant\(")
    for path, text in _source("service", "alphawatch/integrations"):
        if path.name == "layers.py" and path.parent.name == "db":
            continue
        assert not built.search(text), f"{path}: select layer rows with LayerSelection"


@pytest.mark.parametrize(
    "function",
    [queries.trend, queries.trend_rows, queries.block_trend_rows, queries.heatmap, queries.compare],
)
def test_selections_reach_their_query_whole(function: object) -> None:
    parameters = inspect.signature(function).parameters  # type: ignore[arg-type]
    assert "query" in parameters
    assert len(parameters) <= 5


def test_layer_selection_keeps_exactly_the_rows_it_names(db_url: str) -> None:
    from alphawatch.service.db.layers import LayerSelection

    random_run(db_url)

    def names(selection: LayerSelection) -> set[tuple[str, int | None]]:
        with session_scope(make_engine(db_url)) as session:
            return {
                (n, b)
                for n, b in session.execute(
                    select(LayerMetric.name, LayerMetric.block).where(*selection.where())
                )
            }

    every = names(LayerSelection(method="ww", variant=None))
    assert len(every) == 28
    assert names(LayerSelection(method="ks2")) == set()
    picked = names(LayerSelection(method="ww", kinds=("q", "down"), block_min=1, block_max=2))
    assert picked == {(f"model.layers.{b}.{k}_proj", b) for b in (1, 2) for k in ("q", "down")}
    assert names(LayerSelection(method="ww", name="model.layers.3.o_proj")) == {
        ("model.layers.3.o_proj", 3)
    }
    assert names(LayerSelection(method="ww", variant="exp_avg")) == set()


def test_every_api_route_lives_in_a_domain_router() -> None:
    from alphawatch.service.api.routes import ROUTERS

    modules = {
        r.endpoint.__module__.rsplit(".", 1)[-1]
        for api in ROUTERS
        for r in api.routes
        if isinstance(r, APIRoute) and r.path.startswith("/api/v1/")
    }
    assert modules == {"runs", "layers", "trends", "gate", "alerts"}
    for path, text in _source("service/api/routes"):
        assert len(text.splitlines()) < 200, f"{path}: a router is thin"


def test_no_route_takes_its_selection_parameter_by_parameter() -> None:
    from alphawatch.service.api.routes import ROUTERS

    endpoints = [r for api in ROUTERS for r in api.routes if isinstance(r, APIRoute)]
    assert len(endpoints) == 22  # 20, then the layer distances and their CSV
    for route in endpoints:
        parameters = inspect.signature(route.endpoint).parameters
        assert len(parameters) <= 8, f"{route.path}: {len(parameters)} parameters"
