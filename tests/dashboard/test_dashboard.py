"""The dashboard in a real headless chromium, on a database filled by the real pipeline."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from alphawatch.service.api import create_app
from alphawatch.service.db import queue, registry
from alphawatch.service.db.models import Checkpoint
from alphawatch.service.db.session import make_engine, session_scope, utcnow
from alphawatch.settings import Settings
from alphawatch.trust import Thresholds
from alphawatch.workers.watcher import Watcher
from tests.live import refused_by_a_stopped_server, serve

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
MISSING_RUN = 999_999
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Site:
    url: str
    run_id: int
    empty_run_id: int
    other_run_id: int
    live_run_id: int
    live_dir: Path
    source: Path
    settings: Settings
    hostile_run_id: int


@pytest.fixture(scope="module")
def site(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    from alphawatch.service.db.migrations import upgrade

    base = tmp_path_factory.mktemp("dash")
    runs = base / "runs"
    run = runs / "tiny-llama"
    shutil.copytree(tiny_run, run)
    # A corrupt checkpoint next to good ones: the page must show it failed, and why.
    bad = run / "checkpoint-25"
    shutil.copytree(run / "checkpoint-20", bad)
    (bad / "model.safetensors").write_bytes(b"garbage, not a safetensors file" * 4)
    other = runs / "tiny-llama-short"
    other.mkdir(parents=True)
    for step in (10, 30):
        shutil.copytree(tiny_run / f"checkpoint-{step}", other / f"checkpoint-{step}")
    live = runs / "live-run"
    live.mkdir()
    shutil.copytree(tiny_run / "checkpoint-10", live / "checkpoint-10")
    empty = runs / "empty-run"
    empty.mkdir()
    # What discovery refuses: a step beyond 64 bits (recorded on the run) and a checkpoint
    # folder that links out of the allowed root (recorded on a failed checkpoint).
    hostile = runs / "hostile-run"
    shutil.copytree(tiny_run / "checkpoint-10", hostile / f"checkpoint-{2**64}")
    shutil.copytree(tiny_run / "checkpoint-10", base / "outside" / "checkpoint-5")
    (hostile / "checkpoint-5").symlink_to(base / "outside" / "checkpoint-5")
    url = f"sqlite:///{base / 'dash.db'}"
    upgrade(url)
    settings = Settings(
        database_url=url, device="cpu", settle_s=0.0, max_attempts=1, allowed_roots=[runs]
    )
    Watcher(settings, [run, other, live, empty, hostile]).run_once()
    with serve(create_app(settings)) as base_url:
        listed = httpx.get(f"{base_url}/api/v1/runs").json()["runs"]
        ids = {r["name"]: r["id"] for r in listed}
        yield Site(
            base_url,
            ids["tiny-llama"],
            ids["empty-run"],
            ids["tiny-llama-short"],
            ids["live-run"],
            live,
            tiny_run,
            settings,
            ids["hostile-run"],
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def expected_console() -> list[str]:
    """Text of browser console errors a test asks for (the browser logs every 4xx answer)."""
    return []


@pytest.fixture
def page(browser: Any, expected_console: list[str]) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))

    def on_console(message: Any) -> None:
        text = f"{message.text} {message.location.get('url', '')}"
        if message.type != "error" or any(e in text for e in expected_console):
            return
        if not refused_by_a_stopped_server(text):
            errors.append(text)

    pg.on("console", on_console)
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(250)  # let Plotly finish its transitions before the picture
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _data(page: Any, div: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = page.evaluate(
        f"() => (document.getElementById('{div}')?.data || []).map((t) => ({{"
        " type: t.type || 'scatter', name: t.name, x: Array.from(t.x || []),"
        " y: t.y ? Array.from(t.y) : null, text: t.text || null,"
        " customdata: t.customdata || null, xaxis: t.xaxis || 'x',"
        " rows: t.z ? t.z.length : 0 }))"
    )
    return result


def _api(site: Site, path: str) -> Any:
    response = httpx.get(f"{site.url}/api/v1{path}", timeout=30)
    response.raise_for_status()
    return response.json()


def _used(texts: list[str]) -> list[int]:
    return [int(t.split("used ")[1].split(" ")[0]) for t in texts]


def test_runs_overview_lists_runs_with_sparklines_and_gate(page: Any, site: Site) -> None:
    page.goto(site.url + "/")
    page.wait_for_selector("#runs-table")
    text = page.inner_text("#runs-table")
    assert "tiny-llama" in text and "empty-run" in text
    page.wait_for_function(
        f"() => document.getElementById('spark-{site.run_id}')?.data?.[0]?.y?.length === 3"
    )
    spark = _data(page, f"spark-{site.run_id}")[0]
    trend = _api(site, f"/runs/{site.run_id}/trend?metric=alpha&stat=median&filter=trusted")
    assert spark["x"] == [10, 20, 30]
    assert spark["y"] == pytest.approx([p["value"] for p in trend["points"]])
    page.wait_for_selector(f"#gate-{site.run_id} .badge")
    gate = _api(site, f"/runs/{site.run_id}/gate")
    badge = page.inner_text(f"#gate-{site.run_id}")
    assert ("would fail" in badge) == (not gate["passed"])
    # A run with nothing analysed is "no data", never a red failure.
    page.wait_for_selector(f"#gate-{site.empty_run_id} .badge")
    assert "no data" in page.inner_text(f"#gate-{site.empty_run_id}")
    row = page.inner_text(f"tr[data-run='{site.run_id}']")
    summary = next(r for r in _api(site, "/runs")["runs"] if r["id"] == site.run_id)
    assert "1 failed" in row and f"{summary['latest_alpha']:.3f}" in row
    _shot(page, "runs")


def test_runs_overview_without_runs_says_how_to_start(page: Any, tmp_path: Path) -> None:
    from alphawatch.service.db.migrations import upgrade

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    upgrade(url)
    with serve(create_app(Settings(database_url=url))) as base_url:
        page.goto(base_url + "/")
        page.wait_for_selector("#runs-empty")
        assert "alphawatch up RUN_DIR" in page.inner_text("#runs-empty")
        _shot(page, "runs-empty")


def test_runs_overview_shows_how_far_a_run_is_behind(page: Any, tmp_path: Path) -> None:
    from alphawatch.service.db.migrations import upgrade

    url = f"sqlite:///{tmp_path / 'lag.db'}"
    upgrade(url)
    # Queued 15.5 min ago and later: the badge reads whole minutes, whatever the test's pace.
    queued = utcnow() - timedelta(seconds=930)
    with session_scope(make_engine(url)) as session:
        behind = registry.ensure_run(session, name="behind", path="/r/behind")
        keeping_up = registry.ensure_run(session, name="keeping-up", path="/r/keeping-up")
        for step in (10, 20, 30):
            checkpoint_id = registry.register_checkpoint(
                session,
                run_id=behind,
                step=step,
                path=f"/r/behind/{step}",
                fingerprint="x",
                fmt="hf",
            )
            session.execute(
                update(Checkpoint)
                .where(Checkpoint.id == checkpoint_id)
                .values(discovered_at=queued + timedelta(seconds=step))
            )
    with serve(create_app(Settings(database_url=url))) as base_url:
        page.goto(base_url + "/")
        page.wait_for_selector(f"#lag-{behind}")
        assert page.inner_text(f"#lag-{behind}") == "behind by 3 checkpoints / 15 min"
        assert page.query_selector(f"#lag-{keeping_up}") is None
        assert "keeping-up" in page.inner_text("#runs-table")
        _shot(page, "runs-lag")


def test_skipped_checkpoints_are_drawn_apart_from_pending(page: Any, tmp_path: Path) -> None:
    from alphawatch.service.db.migrations import upgrade

    url = f"sqlite:///{tmp_path / 'skip.db'}"
    upgrade(url)
    with session_scope(make_engine(url)) as session:
        run_id = registry.ensure_run(session, name="cpu-fleet", path="/r/cpu-fleet")
        for step in range(100, 1100, 100):
            registry.register_checkpoint(
                session, run_id=run_id, step=step, path=f"/r/{step}", fingerprint="x", fmt="hf"
            )
        queue.reorder(session, run_id=run_id)
        assert queue.keep_up(session, run_id=run_id, bound=3) == 7
    with serve(create_app(Settings(database_url=url))) as base_url:
        page.goto(base_url + "/")
        page.wait_for_selector("#runs-table")
        assert "3 pending · 7 skipped" in page.inner_text(f"tr[data-run='{run_id}']")
        page.goto(f"{base_url}/#/runs/{run_id}")
        page.wait_for_selector("#checkpoints tr.ck-skipped")
        assert page.inner_text("#run-skipped") == "7 skipped"
        assert page.locator("#checkpoints tr.ck-skipped").count() == 7
        assert page.locator("#checkpoints tr.ck-pending").count() == 3
        skipped = page.locator("#checkpoints tr.ck-skipped td.status-skipped").first
        pending = page.locator("#checkpoints tr.ck-pending td.status-pending").first
        assert skipped.inner_text() == "skipped" and pending.inner_text() == "pending"

        def style(cell: Any) -> tuple[str, str, str]:
            return tuple(  # type: ignore[return-value]
                cell.evaluate(
                    "(el) => { const s = getComputedStyle(el); "
                    "return [s.color, s.fontStyle, s.backgroundImage]; }"
                )
            )

        assert style(skipped) != style(pending)
        assert style(skipped)[1] == "italic" and "gradient" in style(skipped)[2]
        row = page.inner_text("#checkpoints tr.ck-skipped")
        assert "skipped to keep up" in row
        _shot(page, "run-skipped")


def test_run_page_plots_have_data_and_failed_checkpoint_shows(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/runs/{site.run_id}")
    page.wait_for_function("() => document.getElementById('trend')?.data?.length >= 4")
    trend = _data(page, "trend")
    api_trend = _api(site, f"/runs/{site.run_id}/trend?metric=alpha&stat=median&filter=trusted")
    median = next(t for t in trend if t["name"] == "median α")
    assert median["x"] == [10, 20, 30]
    assert median["y"] == pytest.approx([p["value"] for p in api_trend["points"]])
    band = next(t for t in trend if t["name"] == "25–75th percentile")
    assert band["y"] == pytest.approx([p["p25"] for p in api_trend["points"]])
    trimmed = next(t for t in trend if t["name"] == "trimmed mean")
    assert trimmed["y"] == pytest.approx([p["trimmed_mean"] for p in api_trend["points"]])
    assert all("used " in t and "excluded " in t for t in median["text"])

    page.wait_for_function("() => document.getElementById('heatmap')?.data?.[0]?.z?.length > 0")
    heat = _data(page, "heatmap")[0]
    assert heat["x"] == [10, 20, 30]
    assert "model.layers.0.self_attn.q_proj" in heat["y"]
    assert heat["rows"] == len(heat["y"])
    # Rows follow the API order: block first, then kind.
    api_heat = _api(site, f"/runs/{site.run_id}/heatmap?metric=alpha")
    assert heat["y"] == api_heat["layers"]
    # The hover names each cell's kind and says which fits are untrusted; those cells are
    # marked (a cross each on a small run), the others not.
    kind = {
        row["name"]: row["kind"]
        for row in _api(site, f"/runs/{site.run_id}/checkpoints/30/layers")["layers"]
    }
    assert heat["customdata"] == [
        [kind[name] + (" · untrusted" if t is False else "") for t in row]
        for name, row in zip(api_heat["layers"], api_heat["trusted"], strict=True)
    ]
    untrusted = {
        (step, name)
        for name, row in zip(api_heat["layers"], api_heat["trusted"], strict=True)
        for step, t in zip(api_heat["steps"], row, strict=True)
        if t is False
    }
    assert untrusted, "the site has untrusted fits to mark"
    marks = _data(page, "heatmap")[1]
    assert marks["name"] == "untrusted"
    assert set(zip(marks["x"], marks["y"], strict=True)) == untrusted

    page.wait_for_function("() => document.getElementById('flags')?.data?.length >= 1")
    assert all(t["x"] == [10, 20, 30] for t in _data(page, "flags"))
    page.wait_for_function("() => document.getElementById('kinds')?.data?.length >= 3")
    kinds = {t["name"]: t for t in _data(page, "kinds")}
    assert {"q", "k", "v", "o", "gate", "up", "down"} <= set(kinds)
    assert len({t["xaxis"] for t in kinds.values()}) == len(kinds)  # one panel per kind
    q = _api(site, f"/runs/{site.run_id}/trend?metric=alpha&filter=trusted&kind=q")
    assert kinds["q"]["y"] == pytest.approx([p["value"] for p in q["points"]])
    page.wait_for_function("() => document.getElementById('companion')?.data?.length >= 2")
    companions = {t["name"] for t in _data(page, "companion")}
    assert {"stable rank", "KS distance D (fit quality)"} <= companions

    row = page.inner_text("#checkpoints tr.ck-failed")
    assert "25" in row and "failed" in row and "model.safetensors" in row
    assert page.locator("#checkpoints tr.ck-done").count() == 3
    _shot(page, "run")


def test_filter_switch_changes_the_trend(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/runs/{site.run_id}?filter=trusted")
    page.wait_for_function("() => document.getElementById('trend')?.data?.length >= 4")
    trusted = next(t for t in _data(page, "trend") if t["name"] == "median α")
    page.select_option("select[data-param=filter]", "all")
    page.wait_for_function("() => location.hash.includes('filter=all')")
    page.wait_for_function(
        "(before) => { const t = document.getElementById('trend')?.data?.[2]?.text;"
        " return t !== undefined && JSON.stringify(t) !== JSON.stringify(before); }",
        arg=trusted["text"],
    )
    everything = next(t for t in _data(page, "trend") if t["name"] == "median α")
    used, used_trusted = _used(everything["text"]), _used(trusted["text"])
    assert all(a >= b for a, b in zip(used, used_trusted, strict=True))
    assert sum(used) > sum(used_trusted)
    api_all = _api(site, f"/runs/{site.run_id}/trend?metric=alpha&filter=all")
    assert used == [p["n_used"] for p in api_all["points"]]
    # The kind switch narrows the trend to attention projections.
    page.select_option("select[data-param=kind]", "attention")
    page.wait_for_function("() => location.hash.includes('kind=attention')")
    page.wait_for_function(
        "(n) => { const t = document.getElementById('trend')?.data?.[2]?.customdata;"
        " return t && t[0] < n; }",
        arg=used[0],
    )
    att = _api(site, f"/runs/{site.run_id}/trend?metric=alpha&filter=all&kind=q,k,v,o,qkv")
    shown = next(t for t in _data(page, "trend") if t["name"] == "median α")
    assert shown["customdata"] == [p["n_used"] for p in att["points"]]
    # The state lives in the URL: a reload shows the same view.
    page.reload()
    page.wait_for_function("() => document.getElementById('trend')?.data?.length >= 4")
    assert page.input_value("select[data-param=kind]") == "attention"
    assert page.input_value("select[data-param=filter]") == "all"


def test_clicking_a_heatmap_cell_opens_the_layer_esd(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/runs/{site.run_id}")
    page.wait_for_function("() => document.getElementById('heatmap')?.data?.[0]?.z?.length > 0")
    # Click the centre of the first row's middle cell through the real mouse.
    box = page.evaluate("""() => {
        const d = document.getElementById('heatmap'); const l = d._fullLayout;
        const xa = l.xaxis, ya = l.yaxis, t = d.data[0];
        const x = xa._offset + xa.l2p(xa.d2l(t.x[1]));
        const y = ya._offset + ya.l2p(ya.d2l(t.y[0]));
        const r = d.getBoundingClientRect();
        return {x: r.left + x, y: r.top + y, layer: t.y[0], step: t.x[1]};
    }""")
    page.mouse.click(box["x"], box["y"])
    page.wait_for_function("() => location.hash.includes('layer=')")
    assert f"step={box['step']}" in page.evaluate("() => location.hash")
    page.wait_for_function("() => document.getElementById('esd')?.data?.[0]?.x?.length > 0")
    assert page.inner_text("#layer-name") == box["layer"]
    history = _data(page, "layer-history")
    api_history = _api(site, f"/runs/{site.run_id}/layers/{box['layer']}/history?metric=alpha")
    alpha = next(t for t in history if t["name"] == "α")
    assert alpha["y"] == pytest.approx([p["value"] for p in api_history["points"]])
    d_band = next(t for t in history if t["name"] == "KS distance D")
    assert d_band["y"] == pytest.approx([p["D"] for p in api_history["points"]])

    esd = _api(site, f"/runs/{site.run_id}/checkpoints/{box['step']}/layers/{box['layer']}/esd")
    traces = _data(page, "esd")
    assert len(traces[0]["x"]) == sum(1 for e in esd["evals"] if e > 0)
    fit = next(t for t in traces if (t["name"] or "").startswith("power law"))
    assert fit["y"] == pytest.approx(esd["fit_line"]["y"])
    axes = page.evaluate(
        "() => { const l = document.getElementById('esd').layout;"
        " return {y: l.yaxis.type, lines: l.shapes.length,"
        " labels: l.annotations.map((a) => a.text.trim())}; }"
    )
    assert axes["y"] == "log"
    assert "xmin" in axes["labels"]
    if esd["mp_bulk_max"]:
        assert "MP edge" in axes["labels"]
    if esd["rand_evals"]:
        assert any(t["name"] == "shuffled W" for t in traces)
    _shot(page, "layer")

    # Another step from the step switch redraws the ESD of that step.
    page.select_option("#esd-step", "30")
    page.wait_for_function("() => location.hash.includes('step=30')")
    later = _api(site, f"/runs/{site.run_id}/checkpoints/30/layers/{box['layer']}/esd")
    page.wait_for_function(
        "(fit) => JSON.stringify(document.getElementById('esd')?.data?.find("
        "(t) => (t.name || '').startsWith('power law'))?.y) === JSON.stringify(fit)",
        arg=later["fit_line"]["y"],
    )


def test_layer_name_picker_opens_the_layer(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/runs/{site.run_id}")
    page.wait_for_function("() => document.querySelectorAll('#layer-pick option').length > 2")
    name = "model.layers.1.mlp.down_proj"
    page.select_option("#layer-pick", name)
    page.wait_for_function("() => document.getElementById('esd')?.data?.[0]?.x?.length > 0")
    assert page.inner_text("#layer-name") == name
    assert page.input_value("#esd-step") == "30"  # the latest analysed step by default


def test_run_page_shows_what_discovery_refused(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/runs/{site.hostile_run_id}")
    page.wait_for_selector("#run-discovery:not([hidden])")
    text = page.inner_text("#run-discovery")
    assert f"checkpoint-{2**64}" in text and "not a step number" in text
    row = page.inner_text("#checkpoints tr.ck-failed")
    assert "5" in row and "checkpoint-5" in row and "outside the allowed roots" in row
    _shot(page, "discovery-errors")
    page.goto(f"{site.url}/#/runs/{site.run_id}")
    page.wait_for_selector("#checkpoints tr.ck-done")
    assert page.locator("#run-discovery").is_hidden()


def test_empty_run_shows_the_empty_state(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/runs/{site.empty_run_id}")
    page.wait_for_selector("#run-empty:not([hidden])")
    text = page.inner_text("#run-empty")
    assert "no checkpoints yet" in text and "alphawatch up" in text
    assert page.locator("#run-body").is_hidden()
    _shot(page, "empty-run")


def test_unknown_run_says_so(page: Any, site: Site, expected_console: list[str]) -> None:
    expected_console.append(f"/runs/{MISSING_RUN}")
    page.goto(f"{site.url}/#/runs/{MISSING_RUN}")
    page.wait_for_selector("#error")
    assert "404" in page.inner_text("#error")


def test_compare_overlays_runs(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/compare?runs={site.run_id},{site.other_run_id}")
    page.wait_for_function("() => document.getElementById('compare')?.data?.length === 2")
    traces = {t["name"]: t for t in _data(page, "compare")}
    assert traces["tiny-llama"]["x"] == [10, 20, 30]
    assert traces["tiny-llama-short"]["x"] == [10, 30]
    # Same checkpoints, same numbers: the short run is a subset of the long one.
    long = dict(zip(traces["tiny-llama"]["x"], traces["tiny-llama"]["y"], strict=True))
    assert traces["tiny-llama-short"]["y"] == pytest.approx([long[10], long[30]])
    _shot(page, "compare")
    page.uncheck(f"#compare-runs input[value='{site.other_run_id}']")
    page.wait_for_function("() => document.getElementById('compare')?.data?.length === 1")


def test_live_page_shows_new_checkpoints_without_reload(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/#/runs/{site.live_run_id}")
    page.wait_for_function("() => document.getElementById('trend')?.data?.[2]?.x?.length === 1")
    page.evaluate("() => { window.__sameDocument = true; }")
    shutil.copytree(site.source / "checkpoint-20", site.live_dir / "checkpoint-20")
    Watcher(site.settings, [site.live_dir]).run_once()
    t0 = time.monotonic()
    page.wait_for_function(
        "() => JSON.stringify(document.getElementById('trend')?.data?.[2]?.x) === '[10,20]'",
        timeout=20_000,
    )
    assert page.evaluate("() => window.__sameDocument === true")  # no reload happened
    assert time.monotonic() - t0 < 15
    page.wait_for_function("() => document.getElementById('heatmap')?.data?.[0]?.x?.length === 2")
    assert page.locator("#checkpoints tr.ck-done").count() == 2


def test_token_protected_server_asks_for_a_token(
    page: Any, tmp_path: Path, expected_console: list[str]
) -> None:
    from alphawatch.service.db.migrations import upgrade
    from alphawatch.service.db.session import make_engine, session_scope
    from alphawatch.service.db.tokens import create_token

    expected_console.append("401 (Unauthorized)")
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    upgrade(url)
    with session_scope(make_engine(url)) as session:
        token = create_token(session, name="dashboard")
    settings = Settings(database_url=url, read_requires_token=True)
    with serve(create_app(settings)) as base_url:
        page.goto(base_url + "/")
        page.wait_for_selector("#token-form")
        page.fill("#token-input", "aw_wrong")
        # The wrong token's answer draws a new form: wait for it, not for the one typed into
        # (a token typed into the old form before it is replaced would be lost).
        page.evaluate("() => { document.getElementById('token-form').dataset.old = '1'; }")
        page.click("#token-form button")
        page.wait_for_selector("#token-form:not([data-old])")
        page.fill("#token-input", token)
        page.click("#token-form button")
        page.wait_for_selector("#runs-empty")
        assert token not in page.evaluate("() => location.href")


def _options(page: Any, param: str) -> list[list[str]]:
    options: list[list[str]] = page.eval_on_selector_all(
        f"select[data-param={param}] option", "(os) => os.map((o) => [o.value, o.textContent])"
    )
    return options


def _kind_panels(page: Any) -> list[str]:
    return [t["name"] for t in _data(page, "kinds")]


def test_pickers_and_kind_order_are_the_apis(page: Any, site: Site) -> None:
    words = _api(site, "/vocabulary")
    page.goto(f"{site.url}/#/runs/{site.run_id}")
    page.wait_for_function("() => document.getElementById('kinds')?.data?.length >= 3")
    assert _options(page, "stat") == [[s["name"], s["label"]] for s in words["statistics"]]
    assert _options(page, "filter") == [[f["name"], f["label"]] for f in words["filters"]]
    assert _options(page, "outliers") == [[r["name"], r["label"]] for r in words["outlier_rules"]]
    assert [v for v, _ in _options(page, "kind")] == [
        "all",
        *(g["name"] for g in words["kind_groups"]),
    ]
    shown = _kind_panels(page)
    assert shown == [k for k in words["kinds"] if k in shown]
    # Another statistic from the picker: the line is the API's numbers for it.
    page.select_option("select[data-param=stat]", "p90")
    page.wait_for_function(
        "() => document.getElementById('trend')?.data?.[2]?.name === '90th percentile α'"
    )
    p90 = _api(site, f"/runs/{site.run_id}/trend?metric=alpha&stat=p90&filter=trusted")
    line = next(t for t in _data(page, "trend") if t["name"] == "90th percentile α")
    assert line["y"] == pytest.approx([p["value"] for p in p90["points"]])
    page.goto(f"{site.url}/#/compare?runs={site.run_id}&stat=p90")
    page.wait_for_function("() => document.getElementById('compare')?.data?.length === 1")
    assert _options(page, "stat") == [[s["name"], s["label"]] for s in words["statistics"]]
    assert _data(page, "compare")[0]["y"] == pytest.approx([p["value"] for p in p90["points"]])


def test_a_changed_vocabulary_changes_the_page(page: Any, site: Site) -> None:
    """Served another vocabulary, the page follows it: nothing of it is baked into the page."""
    from alphawatch.service.api.vocabulary import VocabularyRead, current_vocabulary

    words = _api(site, "/vocabulary")
    stats = [
        {**s, "label": f"stat {s['name']}", "default": s["name"] == "mean"}
        for s in reversed(words["statistics"])
    ]
    changed = VocabularyRead.model_validate(
        {
            **words,
            "statistics": stats,
            "kinds": list(reversed(words["kinds"])),
            "kind_groups": [{"name": "qk", "label": "queries and keys", "kinds": ["q", "k"]}],
        }
    )
    app = create_app(site.settings)
    app.dependency_overrides[current_vocabulary] = lambda: changed
    with serve(app) as url:
        page.goto(f"{url}/#/runs/{site.run_id}?filter=all")
        page.wait_for_function("() => document.getElementById('kinds')?.data?.length >= 3")
        assert _options(page, "stat") == [[s["name"], s["label"]] for s in stats]
        assert page.input_value("select[data-param=stat]") == "mean"  # the served default
        mean = _api(site, f"/runs/{site.run_id}/trend?metric=alpha&stat=mean&filter=all")
        line = next(t for t in _data(page, "trend") if t["name"] == "stat mean α")
        assert line["y"] == pytest.approx([p["value"] for p in mean["points"]])
        shown = _kind_panels(page)
        assert shown == [k for k in reversed(words["kinds"]) if k in shown]
        assert [v for v, _ in _options(page, "kind")] == ["all", "qk"]
        page.select_option("select[data-param=kind]", "qk")
        qk = _api(site, f"/runs/{site.run_id}/trend?metric=alpha&stat=mean&filter=all&kind=q,k")
        page.wait_for_function(
            "(n) => JSON.stringify(document.getElementById('trend')?.data?.[2]?.customdata)"
            " === JSON.stringify(n)",
            arg=[p["n_used"] for p in qk["points"]],
        )
        _shot(page, "vocabulary-changed")


def test_every_module_loads_from_the_server_without_errors(page: Any, site: Site) -> None:
    from alphawatch.dashboard import STATIC_DIR

    modules = {f"/static/{p.relative_to(STATIC_DIR).as_posix()}" for p in STATIC_DIR.rglob("*.js")}
    for view, drawn in (
        ("/", f"spark-{site.run_id}"),
        ("/#/compare", "compare"),
        (f"/#/runs/{site.run_id}?layer=model.layers.0.mlp.up_proj", "esd"),
    ):
        page.goto(site.url + view)
        page.wait_for_function(f"() => document.getElementById('{drawn}')?.data?.length > 0")
        loaded = page.evaluate("() => performance.getEntriesByType('resource').map((e) => e.name)")
        # Every module arrived, and nothing came from anywhere but this server.
        assert modules <= {u.removeprefix(site.url) for u in loaded}
        assert all(u.startswith(site.url) for u in loaded)
    # The page fixture fails the test on any console error or uncaught exception.


@pytest.mark.parametrize(
    "trust",
    [Thresholds(), Thresholds(alpha_max=5.0, over_trained_below=2.5, under_trained_above=4.5)],
)
def test_plots_follow_the_servers_thresholds(page: Any, site: Site, trust: Thresholds) -> None:
    # The band of well-trained α and the heatmap's α scale are the server's trust settings.
    settings = site.settings.model_copy(update={"trust": trust})
    with serve(create_app(settings)) as base_url:
        page.goto(f"{base_url}/#/runs/{site.run_id}")
        # Each panel draws when its own answer arrives: wait for both.
        page.wait_for_function(
            "() => document.getElementById('heatmap')?.data?.[0]?.z?.length"
            " && document.getElementById('trend')?.layout"
        )
        shapes = page.evaluate(
            "() => document.getElementById('trend').layout.shapes"
            ".filter((s) => s.type === 'rect').map((s) => [s.y0, s.y1])"
        )
        zmax = page.evaluate("() => document.getElementById('heatmap').data[0].zmax")
        label = page.evaluate(
            "() => document.getElementById('trend').layout.annotations.map((a) => a.text).join(' ')"
        )
        # Let the rest of the page finish loading before this server goes away.
        page.wait_for_load_state("networkidle")
        page.goto("about:blank")
    assert shapes == [[trust.over_trained_below, trust.under_trained_above]]
    assert zmax == trust.alpha_max
    assert f"{trust.over_trained_below:g} ≤ α ≤ {trust.under_trained_above:g}" in label


def test_requests_after_the_test_stopped_its_server_are_not_page_errors(
    page: Any, tmp_path: Path
) -> None:
    # A page still loading when its test's server stops asks it in vain: those refusals are
    # the test's ending, not the page's errors; any other refused request still is one.
    url = f"sqlite:///{tmp_path / 'late.db'}"
    from alphawatch.service.db.migrations import upgrade

    upgrade(url)
    with serve(create_app(Settings(database_url=url))) as base_url:
        page.goto(base_url + "/")
        page.wait_for_selector("#runs-empty")
    page.evaluate("(u) => fetch(u + '/api/v1/runs').catch(() => null)", base_url)
    page.wait_for_timeout(200)
    refused = f"Failed to load resource: net::ERR_CONNECTION_REFUSED {base_url}/api/v1/runs"
    assert refused_by_a_stopped_server(refused)
    elsewhere = refused.replace(base_url, "http://127.0.0.1:9")
    assert not refused_by_a_stopped_server(elsewhere)
