"""The dashboard in a real headless chromium, on a database filled by the real pipeline."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from alphawatch.settings import Settings
from service.api import create_app
from tests.live import serve
from workers.watcher import Watcher

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]


@dataclass
class Site:
    url: str
    run_id: int
    empty_run_id: int


@pytest.fixture(scope="module")
def site(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    from service.db.migrations import upgrade

    base = tmp_path_factory.mktemp("dash")
    runs = base / "runs"
    run = runs / "tiny-llama"
    shutil.copytree(tiny_run, run)
    bad = run / "checkpoint-25"
    shutil.copytree(run / "checkpoint-20", bad)
    (bad / "model.safetensors").write_bytes(b"garbage, not a safetensors file" * 4)
    empty = runs / "empty-run"
    empty.mkdir()
    url = f"sqlite:///{base / 'dash.db'}"
    upgrade(url)
    settings = Settings(database_url=url, device="cpu", settle_s=0.0, max_attempts=1,
                        allowed_roots=[runs])
    Watcher(settings, [run, empty]).run_once()
    import httpx

    with serve(create_app(settings)) as base_url:
        listed = httpx.get(f"{base_url}/api/v1/runs").json()["runs"]
        ids = {r["name"]: r["id"] for r in listed}
        yield Site(base_url, ids["tiny-llama"], ids["empty-run"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _plot_len(page: Any, div: str, trace: int = 0, axis: str = "x") -> int:
    return int(page.evaluate(
        f"() => {{ const d = document.getElementById('{div}');"
        f" return d && d.data && d.data[{trace}] ? (d.data[{trace}].{axis} || []).length : -1; }}"
    ))


def test_runs_overview_lists_runs_with_sparklines(page: Any, site: Site) -> None:
    page.goto(site.url + "/")
    page.wait_for_selector("#runs-table")
    text = page.inner_text("#runs-table")
    assert "tiny-llama" in text and "empty-run" in text
    page.wait_for_function(
        f"() => document.getElementById('spark-{site.run_id}')?.data?.[0]?.y?.length === 3")
    page.wait_for_selector(f"#gate-{site.run_id} .badge")
    _shot(page, "runs")


def test_run_page_plots_have_data_and_failed_checkpoint_shows(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/runs/{site.run_id}")
    page.wait_for_function("() => document.getElementById('trend')?.data?.length >= 3")
    steps = page.evaluate("() => document.getElementById('trend').data[2].x")
    assert steps == [10, 20, 30]
    page.wait_for_function("() => document.getElementById('heatmap')?.data?.[0]?.z?.length > 0")
    heat = page.evaluate("() => { const t = document.getElementById('heatmap').data[0];"
                         " return {x: t.x, y: t.y, rows: t.z.length}; }")
    assert heat["x"] == [10, 20, 30]
    assert "model.layers.0.self_attn.q_proj" in heat["y"]
    assert heat["rows"] == len(heat["y"])
    page.wait_for_function("() => document.getElementById('flags')?.data?.length >= 1")
    row = page.inner_text("#checkpoints tr.ck-failed")
    assert "25" in row and "failed" in row and "model.safetensors" in row
    _shot(page, "run")


def test_filter_switch_changes_the_trend(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/runs/{site.run_id}?filter=trusted")
    page.wait_for_function("() => document.getElementById('trend')?.data?.length >= 3")
    trusted = page.evaluate("() => document.getElementById('trend').data[2].text")
    page.select_option("select[data-param=filter]", "all")
    page.wait_for_function("() => location.hash.includes('filter=all')")
    page.wait_for_function(
        "(before) => { const t = document.getElementById('trend')?.data?.[2]?.text;"
        " return t !== undefined && JSON.stringify(t) !== JSON.stringify(before); }", arg=trusted)
    everything = page.evaluate("() => document.getElementById('trend').data[2].text")
    used = [int(t.split("used ")[1].split(" ")[0]) for t in everything]
    used_trusted = [int(t.split("used ")[1].split(" ")[0]) for t in trusted]
    assert all(a >= b for a, b in zip(used, used_trusted, strict=True))
    assert sum(used) > sum(used_trusted)


def test_clicking_a_heatmap_cell_opens_the_layer_esd(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/runs/{site.run_id}")
    page.wait_for_function("() => document.getElementById('heatmap')?.data?.[0]?.z?.length > 0")
    # Click the centre of the first row's last cell through the real mouse.
    box = page.evaluate("""() => {
        const d = document.getElementById('heatmap'); const l = d._fullLayout;
        const xa = l.xaxis, ya = l.yaxis, t = d.data[0];
        const x = xa._offset + xa.l2p(xa.d2l(t.x[t.x.length - 1]));
        const y = ya._offset + ya.l2p(ya.d2l(t.y[0]));
        const r = d.getBoundingClientRect();
        return {x: r.left + x, y: r.top + y, layer: t.y[0], step: t.x[t.x.length - 1]};
    }""")
    page.mouse.click(box["x"], box["y"])
    page.wait_for_function("() => location.hash.includes('layer=')")
    assert f"step={box['step']}" in page.evaluate("() => location.hash")
    page.wait_for_function("() => document.getElementById('esd')?.data?.[0]?.x?.length > 0")
    assert _plot_len(page, "layer-history") == 3
    name = page.inner_text("#layer-name")
    assert box["layer"] in name
    page.wait_for_timeout(300)
    _shot(page, "layer")


def test_empty_run_shows_the_empty_state(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/runs/{site.empty_run_id}")
    page.wait_for_selector("#run-empty")
    assert "no checkpoints yet" in page.inner_text("#run-empty")
    _shot(page, "empty-run")


def test_compare_overlays_runs(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/compare?runs={site.run_id}")
    page.wait_for_function("() => document.getElementById('compare')?.data?.length === 1")
    assert _plot_len(page, "compare") == 3
    _shot(page, "compare")
