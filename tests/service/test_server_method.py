"""A server whose fit method is not ``ww`` answers with that method wherever none is named.

The real worker analyses the tiny training run with ``ks2`` (ALPHAWATCH_FIT_METHOD), so the
database holds ks2 rows only. Every route that takes ``method`` must then answer a request that
names none exactly as one that names ks2; the gate, the vocabulary, the run summaries, the CSVs,
the layer distances, ``alphawatch gate`` and ``alphawatch export`` follow the same setting.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from alphawatch.cli import main
from alphawatch.service.api import create_app
from alphawatch.service.db.session import dispose_all
from alphawatch.settings import Settings
from alphawatch.vocabulary import FitMethod
from alphawatch.workers.watcher import Watcher
from tests import pg
from tests.live import serve

METHOD = FitMethod.KS2


@pytest.fixture(scope="module")
def server_settings(pg_admin_url: str, pg_template: str, tiny_run: Path) -> Iterator[Settings]:
    """One database for the module, filled by the real worker running with ``ks2``."""
    name = f"aw_method_{os.getpid()}"
    url = pg.create_database(pg_admin_url, name, template=pg_template)
    settings = Settings(
        database_url=url, device="cpu", settle_s=0.0, fit_method=METHOD, deltas=["distances"]
    )
    Watcher(settings, [tiny_run]).run_once()
    yield settings
    dispose_all()
    pg.drop_database(pg_admin_url, name)


@pytest.fixture(scope="module")
def client(server_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(server_settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def run(client: TestClient) -> dict[str, Any]:
    """The run's id, an analysed step and a layer of it, found by naming the method."""
    (summary,) = client.get("/api/v1/runs").json()["runs"]
    rid = summary["id"]
    checkpoints = client.get(f"/api/v1/runs/{rid}/checkpoints").json()["checkpoints"]
    step = max(c["step"] for c in checkpoints if c["status"] == "done")
    layers = client.get(
        f"/api/v1/runs/{rid}/checkpoints/{step}/layers", params={"method": METHOD.value}
    ).json()["layers"]
    layer = next(x["name"] for x in layers if x["alpha"] is not None)
    return {"id": rid, "step": step, "layer": layer, "summary": summary}


def _trusted_used(points: list[dict[str, Any]]) -> bool:
    return any(p["n_used"] > 0 and p["value"] is not None for p in points)


# Every route that takes a method, and what its answer holds when it read the stored rows.
ROUTES: dict[str, Any] = {
    "/api/v1/runs/{run_id}/checkpoints/{step}/layers": lambda a: len(a["layers"]) > 0,
    "/api/v1/runs/{run_id}/layers.csv": lambda a: len(a) > 0,
    "/api/v1/runs/{run_id}/layers/{layer_name}/history": lambda a: len(a["points"]) > 0,
    "/api/v1/runs/{run_id}/trend": lambda a: _trusted_used(a["points"]),
    "/api/v1/runs/{run_id}/heatmap": lambda a: len(a["layers"]) > 0,
    "/api/v1/runs/{run_id}/blocks": lambda a: any(_trusted_used(b["points"]) for b in a["blocks"]),
    "/api/v1/runs/{run_id}/variants": lambda a: any(v["n_layers"] > 0 for v in a["variants"]),
    "/api/v1/runs/{run_id}/flags": lambda a: any(p["ok"] > 0 for p in a["points"]),
    "/api/v1/runs/{run_id}/checkpoints/{step}/layers/{layer_name}/esd": lambda a: (
        len(a["evals"]) > 0
    ),
    "/api/v1/runs/{run_id}/gate": lambda a: a["n_used"] > 0 and a["value"] is not None,
    "/api/v1/compare": lambda a: _trusted_used(a["runs"][0]["points"]),
    "/api/v1/runs/{run_id}/distances": lambda a: any(
        v is not None for row in a["change_fro"] for v in row
    ),
    "/api/v1/runs/{run_id}/distances.csv": lambda a: len(a) > 0,
}


def _answer(client: TestClient, route: str, run: dict[str, Any], method: str | None) -> Any:
    path = route.format(run_id=run["id"], step=run["step"], layer_name=run["layer"])
    params: dict[str, Any] = {"runs": run["id"]} if route.endswith("/compare") else {}
    if method is not None:
        params["method"] = method
    response = client.get(path, params=params)
    assert response.status_code == 200, (route, method, response.text)
    if route.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(response.text)))
        # layers.csv names each row's method; distances.csv holds the server method's rows only
        assert {r.get("method", METHOD.value) for r in rows} <= {METHOD.value}
        return rows
    return response.json()


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_request_naming_no_method_reads_the_servers(
    client: TestClient, run: dict[str, Any], route: str
) -> None:
    named = _answer(client, route, run, METHOD.value)
    assert ROUTES[route](named), f"{route}: the ks2 rows were not read"
    assert _answer(client, route, run, None) == named


def test_every_route_with_a_method_is_covered_and_defaults_to_none(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    with_method = {}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            for param in operation.get("parameters", []):
                if param["name"] == "method":
                    with_method[path] = param
    assert set(with_method) == set(ROUTES)
    for path, param in with_method.items():
        # The default is the server's; the schema names no method of its own.
        assert "default" not in param["schema"], path
        assert set(param["schema"]["enum"]) == {m.value for m in FitMethod}, path
        assert param.get("required") is not True, path


def test_gate_judges_the_servers_rows(client: TestClient, run: dict[str, Any]) -> None:
    gate = f"/api/v1/runs/{run['id']}/gate"
    passed = client.get(
        gate, params={"max_alpha": 100, "min_alpha": 0, "max_untrusted_share": 1}
    ).json()
    assert passed["passed"] is True and passed["n_used"] > 0, passed
    failed = client.get(gate, params={"min_alpha": 50, "max_untrusted_share": 1}).json()
    assert failed["passed"] is False
    assert [v["rule"] for v in failed["violations"]] == ["min_alpha"], failed
    assert client.get(gate, params={"min_alpha": 50, "strict": True}).status_code == 409


def test_vocabulary_and_run_summaries_use_the_servers_method(
    client: TestClient, run: dict[str, Any]
) -> None:
    methods = client.get("/api/v1/vocabulary").json()["fit_methods"]
    assert [m["name"] for m in methods if m["default"]] == [METHOD.value]
    assert run["summary"]["latest_alpha"] is not None
    detail = client.get(f"/api/v1/runs/{run['id']}").json()
    assert detail["latest_alpha"] == run["summary"]["latest_alpha"]
    assert detail["methods"] == [METHOD.value]


def test_cli_gate_uses_the_servers_method(
    server_settings: Settings, tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_name = tiny_run.name
    with serve(create_app(server_settings)) as url:
        capsys.readouterr()
        assert (
            main(
                [
                    "gate",
                    "--url",
                    url,
                    "--run",
                    run_name,
                    "--max-alpha",
                    "100",
                    "--min-alpha",
                    "0",
                    "--max-untrusted-share",
                    "1",
                ]
            )
            == 0
        )
        verdict = json.loads(capsys.readouterr().out)
        assert verdict["n_used"] > 0
        assert (
            main(
                [
                    "gate",
                    "--url",
                    url,
                    "--run",
                    run_name,
                    "--min-alpha",
                    "50",
                    "--max-untrusted-share",
                    "1",
                ]
            )
            == 1
        )
        assert [v["rule"] for v in json.loads(capsys.readouterr().out)["violations"]] == [
            "min_alpha"
        ]
        # A method named on the command line is the one asked for: ww was never computed.
        assert main(["gate", "--url", url, "--run", run_name, "--method", "ww"]) == 1
        assert [v["rule"] for v in json.loads(capsys.readouterr().out)["violations"]] == [
            "no_trusted_layers"
        ]


def test_cli_export_uses_the_method_setting(
    server_settings: Settings,
    client: TestClient,
    run: dict[str, Any],
    tmp_path: Path,
    tiny_run: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("ALPHAWATCH_FIT_METHOD", METHOD.value)
    assert (
        main(
            [
                "export",
                "tensorboard",
                "--run",
                tiny_run.name,
                "--logdir",
                str(tmp_path),
                "--db",
                server_settings.database_url,
            ]
        )
        == 0
    )
    capsys.readouterr()
    events = EventAccumulator(str(tmp_path / tiny_run.name), size_guidance={"scalars": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("alphawatch/alpha/median")}
    trend = client.get(f"/api/v1/runs/{run['id']}/trend").json()["points"]
    served = {p["step"]: p["value"] for p in trend if p["value"] is not None}
    assert served and logged.keys() == served.keys()
    for step, value in served.items():
        assert logged[step] == pytest.approx(value, rel=1e-6)
