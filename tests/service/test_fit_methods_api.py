"""Finger-robust methods and the distribution tests through the database and the API.

A real checkpoint of the tiny training run is analysed with ``ww`` and ``xmin_peak``; both are
stored for the same checkpoint and never mixed: each method's layer rows, trend and CSV carry
its own numbers, with the truncated-power-law fit and the likelihood-ratio tests beside them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from alphawatch.cli import analyze_path
from alphawatch.service import robust
from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from alphawatch.vocabulary import FitMethod
from tests.factories import analysed_run

TESTS = (
    "tpl_alpha",
    "tpl_lambda",
    "pl_vs_tpl_R",
    "pl_vs_tpl_p",
    "pl_vs_lognormal_R",
    "pl_vs_lognormal_p",
)


@pytest.fixture(scope="module")
def analysed(tiny_run: Path) -> dict[str, list[dict[str, Any]]]:
    settings = Settings(device="cpu")
    return {
        m: analyze_path(tiny_run / "checkpoint-30", settings, m)["layers"]
        for m in ("ww", "xmin_peak")
    }


def _store(url: str, layers: list[dict[str, Any]]) -> None:
    # The printed shape is the analyze document's own: the table has no column for it.
    rows = [{k: v for k, v in x.items() if k != "shape"} for x in layers]
    analysed_run(url, name="run", steps=[30], layers=lambda _: rows)


def test_methods_are_stored_and_served_apart(
    db_url: str, analysed: dict[str, list[dict[str, Any]]]
) -> None:
    ww, peak = analysed["ww"], analysed["xmin_peak"]
    assert [x["alpha"] for x in ww] != [x["alpha"] for x in peak]
    _store(db_url, ww + peak)
    with TestClient(create_app(Settings(database_url=db_url))) as client:
        (run,) = client.get("/api/v1/runs").json()["runs"]
        rid = run["id"]
        assert client.get(f"/api/v1/runs/{rid}").json()["methods"] == ["ww", "xmin_peak"]
        for method, layers in analysed.items():
            served = client.get(
                f"/api/v1/runs/{rid}/checkpoints/30/layers", params={"method": method}
            ).json()["layers"]
            by_name = {x["name"]: x for x in served}
            for layer in layers:
                row = by_name[layer["name"]]
                assert row["method"] == method
                assert row["alpha"] == pytest.approx(layer["alpha"], rel=1e-12)
                for key in TESTS:
                    assert row[key] == pytest.approx(layer[key], rel=1e-12), key
            (point,) = client.get(
                f"/api/v1/runs/{rid}/trend", params={"method": method, "filter": "all"}
            ).json()["points"]
            chosen = robust.select(
                layers, metric="alpha", filter="all", outliers="none", alpha_max=8.0, mad_k=3.0
            )
            assert point["value"] == pytest.approx(robust.statistic(chosen.values, "median"))
            text = client.get(f"/api/v1/runs/{rid}/layers.csv", params={"method": method}).text
            rows = list(csv.DictReader(io.StringIO(text)))
            assert {r["method"] for r in rows} == {method}
            assert all(r["pl_vs_tpl_R"] != "" for r in rows)
        # An unknown method is a bad request, and the schema lists the known ones.
        bad = client.get(f"/api/v1/runs/{rid}/trend", params={"method": "nope"})
        assert bad.status_code == 422 and "detail" in bad.json()
        schema = client.get("/openapi.json").json()
        trend = schema["paths"]["/api/v1/runs/{run_id}/trend"]["get"]["parameters"]
        (param,) = [p for p in trend if p["name"] == "method"]
        assert set(param["schema"]["enum"]) == {m.value for m in FitMethod}
        layer_schema = schema["components"]["schemas"]["LayerMetricRead"]["properties"]
        assert set(TESTS) | {"num_fingers", "crosscheck_diff"} <= set(layer_schema)
        vocabulary = client.get("/api/v1/vocabulary").json()
        assert [m["name"] for m in vocabulary["fit_methods"]] == [m.value for m in FitMethod]


def test_flag_counts_cover_every_fit_status() -> None:
    from alphawatch.service.api.queries import FIT_STATUSES
    from alphawatch.service.api.schemas import FlagPoint
    from alphawatch.vocabulary import FitStatus

    assert set(FIT_STATUSES) == {s.value for s in FitStatus} <= set(FlagPoint.model_fields)
