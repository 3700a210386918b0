"""A tensor key holding ``@`` is a plain layer, and one refused request never blanks the run page.

``@`` separates a layer from the variants alphawatch derives (``<layer>@exp_avg``,
``<layer>@w<k>``): a key such as ``q@exp_avg.weight`` passed for a gradient, and ``x@bogus!``
for a variant the API refuses with 422, which turned the whole run page into "Could not load".
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from alphawatch.workers.watcher import Watcher
from tests.dashboard import test_dashboard as dashboard
from tests.live import serve

browser, expected_console, page = dashboard.browser, dashboard.expected_console, dashboard.page
_data = dashboard._data

KEYS = ("model.layers.0.q@exp_avg.weight", "x@bogus!.weight", "model.layers.0.mlp.up_proj.weight")
NAMES = {"model.layers.0.q\\x40exp_avg", "x\\x40bogus!", "model.layers.0.mlp.up_proj"}


@dataclass
class Served:
    url: str
    run_id: int
    database: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    import torch
    from safetensors.torch import save_file

    from alphawatch.service.db.migrations import upgrade

    base = tmp_path_factory.mktemp("reserved")
    run = base / "runs" / "at-signs"
    g = torch.Generator().manual_seed(0)
    for step in (1, 2):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(
            {k: torch.randn(64, 48, generator=g) for k in KEYS}, str(folder / "model.safetensors")
        )
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    database = base / "r.db"
    upgrade(f"sqlite:///{database}")
    settings = Settings(
        database_url=f"sqlite:///{database}",
        device="cpu",
        settle_s=0.0,
        max_attempts=1,
        allowed_roots=[base / "runs"],
    )
    watcher = Watcher(settings, [run])
    try:
        assert watcher.run_once() == 2
    finally:
        watcher.close()
    with serve(create_app(settings)) as url:
        (listed,) = httpx.get(f"{url}/api/v1/runs").json()["runs"]
        yield Served(url, listed["id"], database)


def _get(served: Served, path: str) -> Any:
    response = httpx.get(f"{served.url}/api/v1{path}", timeout=30)
    response.raise_for_status()
    return response


def test_keys_holding_at_signs_are_plain_layers(served: Served) -> None:
    run = served.run_id
    layers = _get(served, f"/runs/{run}/checkpoints/2/layers").json()["layers"]
    assert {layer["name"] for layer in layers} == NAMES
    variants = _get(served, f"/runs/{run}/variants").json()["variants"]
    assert [(v["name"], v["n_layers"]) for v in variants] == [("weight", 3)]
    table = list(csv.DictReader(io.StringIO(_get(served, f"/runs/{run}/layers.csv").text)))
    assert {row["variant"] for row in table} == {"weight"}
    for name in NAMES:
        history = _get(served, f"/runs/{run}/layers/{quote(name, safe='')}/history").json()
        assert [p["step"] for p in history["points"]] == [1, 2]
    # Weights-only statistics count every one of them.
    trend = _get(served, f"/runs/{run}/trend?filter=all").json()
    assert [p["n_used"] for p in trend["points"]] == [3, 3]


@pytest.mark.browser
def test_run_page_renders_those_layers(page: Any, served: Served) -> None:
    page.goto(f"{served.url}/#/runs/{served.run_id}?filter=all")
    page.wait_for_function("() => document.getElementById('heatmap')?.data?.length > 0")
    (heat, *_) = _data(page, "heatmap")
    assert set(heat["y"] or []) == NAMES
    assert page.query_selector("#error") is None
    assert page.query_selector(".panel-error") is None


@pytest.mark.browser
def test_a_failing_panel_shows_its_error_and_the_rest_renders(
    page: Any, served: Served, expected_console: list[str]
) -> None:
    # A row stored before names were escaped: its "variant" is one the API refuses, so the
    # variants listing leaves it out and no panel asks for it.
    expected_console.append("422")
    _rename(served, "model.layers.0.mlp.up_proj", "legacy@bogus!")
    try:
        listed = _get(served, f"/runs/{served.run_id}/variants").json()["variants"]
        assert "bogus!" not in {v["name"] for v in listed}
        page.goto(f"{served.url}/#/runs/{served.run_id}?filter=all")
        page.wait_for_function(
            "() => document.getElementById('heatmap')?.data?.length > 0"
            " && document.getElementById('trend')?.data?.length > 0"
            " && document.getElementById('flags')?.data?.length > 0"
        )
        assert page.query_selector("#error") is None
        assert page.query_selector(".panel-error") is None
        assert page.is_visible("#run-body")
        # A bad variant in the URL: the heatmap asks for it and says why it cannot; the trend
        # of the weights is drawn all the same.
        page.goto(f"{served.url}/#/runs/{served.run_id}?filter=all&variant=bogus!")
        page.wait_for_selector("#heatmap .panel-error")
        assert "422" in page.inner_text("#heatmap")
        page.wait_for_function("() => document.getElementById('trend')?.data?.length > 0")
        assert page.query_selector("#error") is None
    finally:
        _rename(served, "legacy@bogus!", "model.layers.0.mlp.up_proj")


def _rename(served: Served, old: str, new: str) -> None:
    with contextlib.closing(sqlite3.connect(served.database)) as db, db:
        db.execute("UPDATE layer_metric SET name = ? WHERE name = ?", (new, old))
