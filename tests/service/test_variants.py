"""Weights, gradients (``@exp_avg``) and nested widths (``@w<k>``) side by side, never mixed.

Each variant's alphas are drawn from a range of its own, so a statistic that mixed them in
would move out of the range it must stay in.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient

from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from tests.db import rows
from tests.factories import KINDS, Row, analysed_run, layer_row

STEPS = (10, 20, 30)
# Alpha ranges that do not overlap: weights, gradients, nested width 32.
RANGES = {"": (2.0, 4.0), "@exp_avg": (4.5, 6.0), "@w32": (6.5, 7.5)}


def _layers(rng: np.random.Generator) -> list[Row]:
    out = []
    for suffix, (low, high) in RANGES.items():
        for block in range(4):
            for kind in KINDS:
                if suffix == "@w32" and kind not in ("gate", "up", "down"):
                    continue
                out.append(
                    layer_row(
                        f"model.layers.{block}.{kind}_proj{suffix}",
                        kind=kind,
                        block=block,
                        alpha=float(rng.uniform(low, high)),
                        D=0.05,
                        xmin=1.0,
                        xmax=10.0,
                        num_pl_spikes=20,
                    )
                )
    return out


def _fill(url: str) -> dict[int, list[Row]]:
    rng = np.random.default_rng(7)
    return analysed_run(url, name="nested", steps=STEPS, layers=lambda _: _layers(rng))


@pytest.fixture
def filled(db_url: str) -> Iterator[tuple[TestClient, dict[int, list[dict[str, object]]]]]:
    written = _fill(db_url)
    with TestClient(create_app(Settings(database_url=db_url))) as client:
        yield client, written


def _median(layers: list[dict[str, object]], suffix: str, **match: object) -> float:
    values = [
        float(x["alpha"])
        for x in layers  # type: ignore[arg-type]
        if str(x["name"]).endswith(suffix)
        and ("@" in str(x["name"])) == bool(suffix)
        and all(x[k] == v for k, v in match.items())
    ]
    return float(np.median(values))


Filled = tuple[TestClient, dict[int, list[dict[str, object]]]]


def test_trends_and_gate_are_of_the_weights_unless_a_variant_is_named(filled: Filled) -> None:
    client, written = filled
    for params, suffix in (
        ({}, ""),
        ({"variant": "exp_avg"}, "@exp_avg"),
        ({"variant": "w32"}, "@w32"),
    ):
        body = client.get("/api/v1/runs/1/trend", params=params).json()
        assert body["variant"] == params.get("variant", "weight")
        for point in body["points"]:
            assert point["value"] == pytest.approx(_median(written[point["step"]], suffix))
        # The same through the path computed from layer rows (a kind and block selection).
        picked = client.get(
            "/api/v1/runs/1/trend", params={**params, "kind": "up,down", "block_min": 2}
        ).json()
        for point in picked["points"]:
            layers = [
                x
                for x in written[point["step"]]
                if x["kind"] in ("up", "down") and int(x["block"]) >= 2
            ]  # type: ignore[call-overload]
            assert point["value"] == pytest.approx(_median(layers, suffix))
        gate = client.get("/api/v1/runs/1/gate", params=params).json()
        assert gate["value"] == pytest.approx(_median(written[30], suffix))
    run = client.get("/api/v1/runs/1/checkpoints").json()["checkpoints"][0]
    assert run["n_layers"] == 4 * len(KINDS), "a checkpoint counts its weight matrices"


def test_heatmap_by_variant_kind_and_block_last_first(filled: Filled) -> None:
    client, _ = filled
    weights = client.get("/api/v1/runs/1/heatmap").json()
    assert len(weights["layers"]) == 4 * len(KINDS)
    assert not [n for n in weights["layers"] if "@" in n]
    assert weights["blocks"][0] == 0
    gradients = client.get(
        "/api/v1/runs/1/heatmap",
        params={"variant": "exp_avg", "order": "block_desc", "kind": "q,down"},
    ).json()
    assert gradients["variant"] == "exp_avg"
    assert gradients["layers"] == [
        f"model.layers.{b}.{k}_proj@exp_avg" for b in (3, 2, 1, 0) for k in ("q", "down")
    ]
    assert gradients["blocks"] == [3, 3, 2, 2, 1, 1, 0, 0]
    assert all(4.5 <= z <= 6.0 for row in gradients["z"] for z in row)
    nested = client.get(
        "/api/v1/runs/1/heatmap", params={"variant": "w32", "block_min": 1, "block_max": 2}
    ).json()
    assert nested["layers"] == [
        f"model.layers.{b}.{k}_proj@w32" for b in (1, 2) for k in ("gate", "up", "down")
    ]


def test_heatmap_places_a_layer_the_last_checkpoint_lacks(db_url: str) -> None:
    # Kind and block are read once per layer, from the last checkpoint first: a layer only
    # earlier checkpoints hold keeps its own, and with them its row's place.
    def layers(step: int) -> list[Row]:
        return [
            layer_row(f"model.layers.{block}.{kind}_proj", kind=kind, block=block, alpha=3.0)
            for block in range(3)
            for kind in ("q", "up")
            if not (step == STEPS[-1] and block == 1 and kind == "up")
        ]

    analysed_run(db_url, name="shrinking", steps=STEPS, layers=layers)
    with TestClient(create_app(Settings(database_url=db_url))) as client:
        body = client.get("/api/v1/runs/1/heatmap", params={"order": "block_desc"}).json()
    assert body["layers"] == [f"model.layers.{b}.{k}_proj" for b in (2, 1, 0) for k in ("q", "up")]
    assert body["blocks"] == [2, 2, 1, 1, 0, 0]
    assert body["z"][3] == [3.0, 3.0, None]


def test_block_trends_start_from_the_last_block(filled: Filled) -> None:
    client, written = filled
    body = client.get(
        "/api/v1/runs/1/blocks", params={"variant": "exp_avg", "kind": "gate,up,down"}
    ).json()
    assert [b["block"] for b in body["blocks"]] == [3, 2, 1, 0]
    for block in body["blocks"]:
        for point in block["points"]:
            layers = [
                x
                for x in written[point["step"]]
                if x["block"] == block["block"] and x["kind"] in ("gate", "up", "down")
            ]
            assert point["value"] == pytest.approx(_median(layers, "@exp_avg"))
    ascending = client.get("/api/v1/runs/1/blocks", params={"order": "block"}).json()
    assert [b["block"] for b in ascending["blocks"]] == [0, 1, 2, 3]


def test_variants_history_csv_and_bad_variants(filled: Filled, db_url: str) -> None:
    client, written = filled
    variants = client.get("/api/v1/runs/1/variants").json()["variants"]
    assert [(v["name"], v["source"], v["n_layers"]) for v in variants] == [
        ("weight", "weight", 28),
        ("exp_avg", "exp_avg", 28),
        ("w32", "nested", 12),
    ]
    name = "model.layers.3.down_proj@w32"
    history = client.get(f"/api/v1/runs/1/layers/{quote(name, safe='')}/history").json()
    expected = [next(x["alpha"] for x in written[s] if x["name"] == name) for s in STEPS]
    assert [p["value"] for p in history["points"]] == pytest.approx(expected)
    table = list(csv.DictReader(io.StringIO(client.get("/api/v1/runs/1/layers.csv").text)))
    assert len(table) == 3 * (28 + 28 + 12)
    assert {r["variant"] for r in table} == {"weight", "exp_avg", "w32"}
    for bad in ("w0", "grad", "exp_avg;drop", "w" + "9" * 12):
        answer = client.get("/api/v1/runs/1/trend", params={"variant": bad})
        assert answer.status_code == 422 and "detail" in answer.json()
    # Kept statistics are the weights' only.
    kept = rows(
        db_url,
        "SELECT count(*) FROM checkpoint_stat WHERE metric = 'alpha' "
        "AND kinds = '' AND filter = 'all' AND outliers = 'none' "
        "AND n_used = 28",
    )
    assert kept[0][0] == 3


def test_vocabulary_serves_sources_and_orders(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(database_url=f"sqlite:///{tmp_path}/v.db"))) as c:
        words = c.get("/api/v1/vocabulary").json()
    assert [s["name"] for s in words["sources"]] == [
        "weight",
        "exp_avg",
        "nested",
        "delta",
        "delta_init",
        "delta_prev",
    ]
    assert [o["name"] for o in words["orders"]] == ["block", "block_desc"]
    assert words["variant_separator"] == "@"


def test_gate_command_judges_the_variant_it_names(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from alphawatch.cli import main
    from tests.live import serve

    written = _fill(sqlite_url)
    with serve(create_app(Settings(database_url=sqlite_url))) as base:
        for args, suffix in (([], ""), (["--variant", "exp_avg"], "@exp_avg")):
            main(["gate", "--url", base, "--run", "nested", "--filter", "all", *args])
            verdict = json.loads(capsys.readouterr().out)
            assert verdict["value"] == pytest.approx(_median(written[30], suffix))
        assert main(["gate", "--url", base, "--run", "nested", "--variant", "grad"]) == 2
