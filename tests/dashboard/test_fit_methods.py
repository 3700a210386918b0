"""The run page switches fit method; the layer drill-down shows the fit, the truncated power law
and the distribution tests; the summary reports the weightwatcher cross-check.

A real checkpoint analysed by the real worker twice: with ``ww`` (cross-checking every layer
against weightwatcher) and again with ``xmin_peak``, so both methods are stored for it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from alphawatch.service.api import create_app
from alphawatch.settings import CrossCheck, Settings
from alphawatch.vocabulary import FitMethod
from alphawatch.workers.watcher import Watcher
from tests.dashboard import test_dashboard as dashboard
from tests.live import serve

# The browser and page fixtures of the main dashboard tests (console errors fail a test).
browser, expected_console, page = dashboard.browser, dashboard.expected_console, dashboard.page
_data = dashboard._data

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def two_methods(
    tiny_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int, Settings]]:
    from alphawatch.service.db.migrations import upgrade

    base = tmp_path_factory.mktemp("methods")
    run = base / "runs" / "tiny"
    shutil.copytree(tiny_run / "checkpoint-30", run / "checkpoint-30")
    url = f"sqlite:///{base / 'dash.db'}"
    upgrade(url)
    common = {
        "database_url": url,
        "device": "cpu",
        "settle_s": 0.0,
        "allowed_roots": [base / "runs"],
    }
    Watcher(Settings(**common, crosscheck=CrossCheck(share=1.0)), [run]).run_once()
    Watcher(Settings(**common, fit_method=FitMethod.XMIN_PEAK), [run], reanalyze=True).run_once()
    settings = Settings(**common)
    with serve(create_app(settings)) as base_url:
        (listed,) = httpx.get(f"{base_url}/api/v1/runs").json()["runs"]
        yield base_url, int(listed["id"]), settings


def test_method_switch_and_drill_down(page: Any, two_methods: tuple[str, int, Settings]) -> None:
    url, run_id, _ = two_methods
    api = f"{url}/api/v1/runs/{run_id}"
    assert httpx.get(api).json()["methods"] == ["ww", "xmin_peak"]
    page.goto(f"{url}/#/runs/{run_id}?filter=all")
    page.wait_for_function("() => document.getElementById('trend')?.data?.length >= 4")
    assert page.input_value("select[data-param=method]") == "ww"
    # Every layer was cross-checked against weightwatcher: the summary says so.
    check = httpx.get(api).json()["crosscheck"]
    assert check["layers"] > 0 and check["over_tolerance"] == 0
    summary = page.inner_text("#run-crosscheck")
    assert f"cross-checked {check['layers']} layers" in summary and "⚠" not in summary

    def median() -> list[float]:
        return list(next(t for t in _data(page, "trend") if t["name"] == "median α")["y"])

    ww = median()
    page.select_option("select[data-param=method]", "xmin_peak")
    page.wait_for_function("() => location.hash.includes('method=xmin_peak')")
    expected = httpx.get(f"{api}/trend", params={"method": "xmin_peak", "filter": "all"}).json()
    want = [p["value"] for p in expected["points"]]
    assert want != pytest.approx(ww)
    page.wait_for_function(
        "(w) => JSON.stringify(document.getElementById('trend')?.data?.find("
        "(t) => t.name === 'median α')?.y) === JSON.stringify(w)",
        arg=want,
    )

    layer = "model.layers.0.mlp.down_proj"
    page.select_option("#layer-pick", layer)
    page.wait_for_function("() => document.querySelector('#layer-fit table') !== null")
    row = next(
        x
        for x in httpx.get(f"{api}/checkpoints/30/layers", params={"method": "xmin_peak"}).json()[
            "layers"
        ]
        if x["name"] == layer
    )
    text = page.inner_text("#layer-fit")
    assert "Power law (xmin_peak)" in text and f"α = {row['alpha']:.3f}" in text
    assert f"α = {row['tpl_alpha']:.3f}" in text
    assert f"R = {row['pl_vs_tpl_R']:.2f}" in text
    assert f"R = {row['pl_vs_lognormal_R']:.2f}" in text
    history = next(t for t in _data(page, "layer-history") if t["name"] == "α")
    served = httpx.get(
        f"{api}/layers/{layer}/history", params={"metric": "alpha", "method": "xmin_peak"}
    ).json()["points"]
    assert history["y"] == pytest.approx([p["value"] for p in served])


def test_the_page_opens_on_the_servers_method(
    page: Any, two_methods: tuple[str, int, Settings]
) -> None:
    # The same database served by a server whose worker computes xmin_peak.
    _, run_id, settings = two_methods
    with serve(create_app(settings.model_copy(update={"fit_method": FitMethod.XMIN_PEAK}))) as url:
        page.goto(f"{url}/#/runs/{run_id}?filter=all")
        page.wait_for_function("() => document.getElementById('trend')?.data?.length >= 4")
        assert page.input_value("select[data-param=method]") == FitMethod.XMIN_PEAK.value
        want = [
            p["value"]
            for p in httpx.get(
                f"{url}/api/v1/runs/{run_id}/trend", params={"method": "xmin_peak", "filter": "all"}
            ).json()["points"]
        ]
        assert want and all(v is not None for v in want)
        page.wait_for_function(
            "(w) => JSON.stringify(document.getElementById('trend')?.data?.find("
            "(t) => t.name === 'median α')?.y) === JSON.stringify(w)",
            arg=want,
        )
