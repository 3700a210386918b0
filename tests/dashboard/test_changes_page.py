"""What changed between two steps, in a real browser: a real training run analysed by a real
worker with --deltas prev; the run page ranks the layers by their change with Δα beside, and
draws the distances as a layer x step heatmap, all from the API's numbers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from alphawatch.workers.watcher import Watcher
from tests.dashboard import test_dashboard as dashboard
from tests.live import serve

browser, expected_console, page = dashboard.browser, dashboard.expected_console, dashboard.page
_data, _shot = dashboard._data, dashboard._shot

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@dataclass
class Served:
    url: str
    run_id: int


@pytest.fixture(scope="module")
def served(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from alphawatch.service.db.migrations import upgrade

    base = tmp_path_factory.mktemp("changes")
    run = base / "runs" / "tiny"
    shutil.copytree(tiny_run, run)
    url = f"sqlite:///{base / 'c.db'}"
    upgrade(url)
    settings = Settings(
        database_url=url,
        device="cpu",
        settle_s=0.0,
        max_attempts=1,
        allowed_roots=[base / "runs"],
        deltas=["prev"],
    )
    watcher = Watcher(settings, [run])
    try:
        assert watcher.run_once() == 3
    finally:
        watcher.close()
    with serve(create_app(settings)) as base_url:
        runs = httpx.get(f"{base_url}/api/v1/runs").json()["runs"]
        yield Served(base_url, runs[0]["id"])


def _api(served: Served, path: str, **params: Any) -> Any:
    response = httpx.get(f"{served.url}/api/v1{path}", params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def _bars(page: Any) -> tuple[list[str], list[float], list[str]]:
    bars = page.evaluate(
        "() => { const t = document.getElementById('changes-bars').data[0];"
        " return [Array.from(t.y), Array.from(t.x), Array.from(t.text)]; }"
    )
    return bars[0], bars[1], bars[2]


def test_run_page_ranks_layers_by_change_between_two_steps(page: Any, served: Served) -> None:
    page.goto(f"{served.url}/#/runs/{served.run_id}?filter=all")
    page.wait_for_function("() => document.getElementById('changes-bars')?.data?.length === 1")
    assert page.is_visible("#changes-panel")
    # By default: the last step against the one before it.
    expected = _api(
        served, f"/runs/{served.run_id}/distances", from_step=20, to_step=30, method="ww"
    )["ranking"]
    layers, values, labels = _bars(page)
    assert layers == [r["layer"] for r in expected][: len(layers)]
    assert values == pytest.approx([r["change_fro"] for r in expected][: len(layers)])
    assert values == sorted(values, reverse=True) and values[0] > 0
    # Δα beside each bar, the API's.
    top = expected[0]
    assert labels[0] == f"Δα {'+' if top['delta_alpha'] >= 0 else ''}{top['delta_alpha']:.3f}"
    table = page.locator("#changes-table tbody tr")
    assert table.count() == len(expected)
    assert top["layer"] in table.nth(0).inner_text()
    _shot(page, "run-changes")

    # Another pair of steps: 10 to 30 sums the two steps' changes.
    page.select_option("#changes-controls select[data-param='from']", "10")
    page.wait_for_function(
        "() => document.getElementById('changes-title').textContent.includes('from step 10')"
    )
    wide = _api(served, f"/runs/{served.run_id}/distances", from_step=10, to_step=30)["ranking"]
    page.wait_for_function(
        f"() => Math.abs(document.getElementById('changes-bars').data[0].x[0] - "
        f"{wide[0]['change_fro']}) < 1e-9"
    )
    layers, values, _ = _bars(page)
    assert layers == [r["layer"] for r in wide][: len(layers)]


def test_distance_heatmap_is_the_apis_and_switches_measure(page: Any, served: Served) -> None:
    page.goto(f"{served.url}/#/runs/{served.run_id}?filter=all&dmetric=subspace_overlap")
    page.wait_for_function(
        "() => document.getElementById('distance-heatmap')?.data?.[0]?.type === 'heatmap'"
    )
    answer = _api(served, f"/runs/{served.run_id}/distances")
    z = page.evaluate(
        "() => document.getElementById('distance-heatmap').data[0].z.map((r) => Array.from(r))"
    )
    rows = page.evaluate("() => Array.from(document.getElementById('distance-heatmap').data[0].y)")
    assert rows == answer["layers"]
    assert z == answer["subspace_overlap"]
    assert all(v is None for v in (row[0] for row in z))  # nothing before the first step
    assert all(0.0 <= v <= 1.0 for row in z for v in row[1:] if v is not None)
    # Ranked by overlap: the most rotated layer first.
    _, values, _ = _bars(page)
    assert values == sorted(values)


def test_run_without_distances_says_how_to_get_them(page: Any, tmp_path: Path) -> None:
    from alphawatch.service.db.migrations import upgrade
    from alphawatch.workers.demo_run import train

    run = tmp_path / "runs" / "plain"
    train(run, steps=2, save_every=1, seed=1, d_model=32, ffn=64, n_layers=1)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)
    settings = Settings(database_url=url, device="cpu", settle_s=0.0, check_traps=False)
    watcher = Watcher(settings, [run])
    try:
        assert watcher.run_once() == 2
    finally:
        watcher.close()
    with serve(create_app(settings)) as base_url:
        run_id = httpx.get(f"{base_url}/api/v1/runs").json()["runs"][0]["id"]
        page.goto(f"{base_url}/#/runs/{run_id}?filter=all")
        page.wait_for_function(
            "() => (document.getElementById('distance-heatmap')?.textContent || '')"
            ".includes('--deltas prev')"
        )
