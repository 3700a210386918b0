"""weightwatcher-named columns hold weightwatcher's numbers; ours keep theirs under own names.

Migration 0015 moves what rows analysed before it hold (alphawatch's own measures) to the own
names and clears the weightwatcher-named columns; a downgrade gives the old columns their old
meaning back. The drill-down serves a trapped layer's localisation, and nothing for others.
"""

from __future__ import annotations

import json

import httpx
import pytest
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy import text

from alembic import command
from alphawatch.service.api import create_app
from alphawatch.service.db.migrations import alembic_config
from alphawatch.service.db.rows import LayerRow
from alphawatch.service.db.session import make_engine
from alphawatch.settings import Settings
from tests.factories import analysed_run, layer_row

OWN = {"num_spikes": "edge_spikes", "mp_softrank": "edge_softrank"}
OWN |= {"num_traps": "shuffle_traps", "rand_distance": "shuffle_distance"}
OLD = {"num_spikes": 7, "mp_softrank": 0.25, "num_traps": 2, "rand_distance": 0.5}

LOCALISATION = {
    "shape": [300, 200],
    "vectors": [
        {
            "sigma": 9.0,
            "rows": {"participation": 2.96, "neurons": [7, 42, 123], "weights": [0.4, 0.3, 0.26]},
            "cols": {"participation": 3.86, "neurons": [150, 5], "weights": [0.32, 0.28]},
        }
    ],
}


def _migrate(url: str, revision: str, verb: str) -> None:
    with make_engine(url).begin() as connection:
        config = alembic_config(url)
        config.attributes["connection"] = connection
        getattr(command, verb)(config, revision)


def _before_0015(url: str) -> str:
    down = ScriptDirectory.from_config(alembic_config(url)).get_revision("0015").down_revision
    assert isinstance(down, str)
    return down


def _layer(url: str, columns: list[str]) -> dict[str, object]:
    with make_engine(url).connect() as connection:
        row = connection.execute(text(f"SELECT {', '.join(columns)} FROM layer_metric")).one()
    return dict(zip(columns, row, strict=True))


def _kept(url: str, metric: str) -> int:
    with make_engine(url).connect() as connection:
        return int(
            connection.execute(
                text("SELECT count(*) FROM checkpoint_stat WHERE metric = :m"), {"m": metric}
            ).scalar_one()
        )


def test_0015_moves_old_values_to_own_names_and_back(db_url: str) -> None:
    ours = {OWN[k]: v for k, v in OLD.items()}
    analysed_run(db_url, name="old", steps=[100], layers=lambda _: [layer_row(**ours)])
    assert _kept(db_url, "mp_softrank") > 0
    _migrate(db_url, _before_0015(db_url), "downgrade")
    # a row as the old schema held it: alphawatch's measures under the old names
    assert _layer(db_url, list(OLD)) == OLD
    _migrate(db_url, "head", "upgrade")
    after = _layer(db_url, [*OLD, *OWN.values(), "trap_localisation"])
    assert {own: after[own] for own in OWN.values()} == ours
    # weightwatcher's numbers cannot be had from the old row: its names are left empty
    assert all(after[name] is None for name in OLD) and after["trap_localisation"] is None
    assert _kept(db_url, "mp_softrank") == 0  # kept statistics of the old mp_softrank go too
    _migrate(db_url, _before_0015(db_url), "downgrade")
    assert _layer(db_url, list(OLD)) == OLD
    _migrate(db_url, "head", "upgrade")


def test_rows_take_the_localisation_as_json_text() -> None:
    row = LayerRow.from_mapping(
        {"name": "w", "fit_status": "ok", "trap_localisation": LOCALISATION}
    )
    assert isinstance(row.trap_localisation, str)
    assert json.loads(row.trap_localisation) == LOCALISATION
    with pytest.raises(ValueError, match="not JSON compliant"):
        LayerRow.from_mapping(
            {"name": "w", "fit_status": "ok", "trap_localisation": {"sigma": float("nan")}}
        )


def test_the_drill_down_serves_the_localisation_of_a_trapped_layer(sqlite_url: str) -> None:
    trapped = layer_row(
        "model.layers.0.mlp.up_proj",
        correlation_trap=True,
        trusted=False,
        shuffle_traps=3,
        trap_localisation=LOCALISATION,
    )
    clean = layer_row("model.layers.0.mlp.down_proj", kind="down")
    analysed_run(sqlite_url, name="r", steps=[100], layers=lambda _: [trapped, clean])
    app = create_app(Settings(database_url=sqlite_url))
    with TestClient(app) as client:
        (run,) = client.get("/api/v1/runs").json()["runs"]
        base = f"/api/v1/runs/{run['id']}/checkpoints/100/layers"
        esd = client.get(f"{base}/model.layers.0.mlp.up_proj/esd")
        assert esd.status_code == httpx.codes.OK
        body = esd.json()
        assert body["correlation_trap"] is True
        assert body["trap_localisation"] == LOCALISATION
        other = client.get(f"{base}/model.layers.0.mlp.down_proj/esd").json()
        assert other["correlation_trap"] is False and other["trap_localisation"] is None
        # the per-checkpoint table serves it parsed too; the CSV stays flat
        listed = client.get(base).json()["layers"]
        assert [layer["trap_localisation"] for layer in listed] in (
            [LOCALISATION, None],
            [None, LOCALISATION],
        )
        assert {layer["shuffle_traps"] for layer in listed} == {3, None}
        csv = client.get(f"/api/v1/runs/{run['id']}/layers.csv").text
        header = csv.splitlines()[0].replace('"', "").split(",")
        assert "trap_localisation" not in header and "shuffle_distance" in header
