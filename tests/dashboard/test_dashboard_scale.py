"""The run page on a long run: 500 checkpoints x 300 layers in PostgreSQL, in a real chromium.

The rows are bulk-loaded (the real pipeline would need hours of training for this size); the
API, the database and the page are the real ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from tests.live import serve
from tests.pg import libpq_dsn

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
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
# Records when Plotly is evaluated (the page loads it itself, after its first answers).
PLOTLY_CLOCK = """
let plotly;
Object.defineProperty(window, "Plotly", { configurable: true, get: () => plotly,
  set: (p) => { plotly = p; window.__plotlyAt = performance.now(); } });
"""
CHECKPOINTS, LAYERS = 500, 300
KINDS = ("q", "k", "v", "o", "gate", "up", "down")
NAMES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _fill(url: str) -> int:
    rng = np.random.default_rng(0)
    with psycopg.connect(libpq_dsn(url)) as conn:
        run_id = conn.execute(
            "INSERT INTO run (name, path, created_at) VALUES"
            " ('long-run', '/runs/long-run', now()) RETURNING id"
        ).fetchone()
        assert run_id is not None
        ids = [
            row[0]
            for row in conn.execute(
                "INSERT INTO checkpoint (run_id, step, path, fingerprint, format, status,"
                " discovered_at, n_layers, n_trusted) SELECT %s, s * 100, '/x', '', 'hf', 'done',"
                " now(), %s, %s FROM generate_series(1, %s) s ORDER BY s RETURNING id",
                (run_id[0], LAYERS, LAYERS, CHECKPOINTS),
            ).fetchall()
        ]
        with conn.cursor().copy(
            "COPY layer_metric (checkpoint_id, name, kind, block, method, fit_status, trusted,"
            ' alpha, "D", stable_rank, log_spectral_norm, mean_spike, correlation_trap,'
            " rank_collapse, near_random, over_trained, under_trained) FROM STDIN"
        ) as copy:
            for j, checkpoint_id in enumerate(ids):
                # alpha falls from ~6 to ~3 over training, with layer-to-layer spread.
                alphas = 6 - 3 * j / CHECKPOINTS + rng.normal(0, 0.6, LAYERS)
                poor = rng.random(LAYERS) < 0.1
                for i in range(LAYERS):
                    kind = KINDS[i % len(KINDS)]
                    copy.write_row(
                        (
                            checkpoint_id,
                            f"model.layers.{i // 7}.{NAMES[kind]}",
                            kind,
                            i // 7,
                            "ww",
                            "poor_fit" if poor[i] else "ok",
                            not poor[i],
                            float(alphas[i]),
                            0.05,
                            12.0,
                            0.8,
                            False,
                            False,
                            False,
                            False,
                            False,
                            False,
                        )
                    )
        # A second, small run whose model is over-trained: its CI gate must fail.
        over = conn.execute(
            "INSERT INTO run (name, path, created_at) VALUES"
            " ('over-trained', '/runs/over-trained', now()) RETURNING id"
        ).fetchone()
        assert over is not None
        for step in (100, 200):
            checkpoint = conn.execute(
                "INSERT INTO checkpoint (run_id, step, path, fingerprint, format, status,"
                " discovered_at, n_layers, n_trusted) VALUES (%s, %s, '/x', '', 'hf', 'done',"
                " now(), 7, 7) RETURNING id",
                (over[0], step),
            ).fetchone()
            assert checkpoint is not None
            for kind in KINDS:
                conn.execute(
                    "INSERT INTO layer_metric (checkpoint_id, name, kind, block, method,"
                    ' fit_status, trusted, alpha, "D", mean_spike, correlation_trap,'
                    " rank_collapse, near_random, over_trained, under_trained) VALUES"
                    " (%s, %s, %s, 0, 'ww', 'ok', true, %s, 0.05, false, false, false, false,"
                    " true, false)",
                    (
                        checkpoint[0],
                        f"model.layers.0.{NAMES[kind]}",
                        kind,
                        1.5 if step == 200 else 3.0,
                    ),
                )
        conn.commit()
        conn.execute("ANALYZE")
    return int(run_id[0])


@pytest.fixture
def long_run(pg_url: str) -> Iterator[tuple[str, int]]:
    run_id = _fill(pg_url)
    with serve(create_app(Settings(database_url=pg_url))) as base_url:
        yield base_url, run_id


def test_run_page_stays_responsive_on_a_long_run(long_run: tuple[str, int]) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

    base_url, run_id = long_run
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.add_init_script(PLOTLY_CLOCK)
        t0 = time.monotonic()
        page.goto(f"{base_url}/#/runs/{run_id}")
        page.wait_for_function(
            "() => document.getElementById('heatmap')?.data?.[0]?.z?.length === 300"
            " && document.getElementById('trend')?.data?.[2]?.x?.length === 500",
            timeout=60_000,
        )
        first_paint = time.monotonic() - t0
        page.wait_for_function(
            "() => document.getElementById('kinds')?.data?.length === 7", timeout=60_000
        )
        all_plots = time.monotonic() - t0
        shape = page.evaluate(
            "() => { const t = document.getElementById('heatmap').data;"
            " return {traces: t.length, cols: t[0].z[0].length}; }"
        )
        # One heatmap trace for the values, at most one overlay for the untrusted cells.
        assert shape["traces"] <= 2 and shape["cols"] == 500
        # The cells marked (crosses, or faded past the crosses' limit) are exactly those whose
        # hover says untrusted.
        marked, said = page.evaluate(
            "() => { const [h, o] = document.getElementById('heatmap').data;"
            " const n = (m, f) => m.reduce((s, r) => s + r.filter(f).length, 0);"
            " return [!o ? 0 : o.type === 'heatmap' ? n(o.z, (v) => v === 1) : o.x.length,"
            " n(h.customdata, (c) => c.endsWith(' · untrusted'))]; }"
        )
        assert marked == said and (shape["traces"] == 1 or said > 0)

        # What the load asked, and when: every panel's request made before Plotly was
        # evaluated (so the server computes meanwhile), but the per-kind trends, which wait for
        # the layer list; none twice; the heatmap at the three decimals it shows and one
        # distance matrix only.
        page.wait_for_selector("#changes-panel:not([hidden]) #distance-heatmap .plot-note")
        asked = page.evaluate(
            "() => ({plotly: window.__plotlyAt, api: performance.getEntriesByType('resource')"
            ".filter((e) => e.name.includes('/api/v1/'))"
            ".map((e) => [e.name.split('/api/v1')[1], e.startTime])})"
        )
        paths = [path for path, _ in asked["api"]]
        # The 4 s poll may have asked the run's summary again.
        polled = f"/runs/{run_id}"
        assert len(set(paths)) == len(paths) - max(0, paths.count(polled) - 1), paths
        per_kind = [p for p in paths if f"/runs/{run_id}/trend?" in p and "kind=" in p]
        assert len(per_kind) == 7
        early = [(p, start) for p, start in asked["api"] if p != polled and p not in per_kind]
        # The vocabulary, checkpoints and gate; the layer list, trend, heatmap, flags,
        # variants, distances and four companion trends.
        assert len(early) == 13
        assert all(start < asked["plotly"] for _, start in early), asked
        heat = next(p for p in paths if p.startswith(f"/runs/{run_id}/heatmap?"))
        assert "digits=3" in heat
        distances = next(p for p in paths if p.startswith(f"/runs/{run_id}/distances?"))
        assert "matrices=change_fro" in distances
        cells = page.evaluate("() => document.getElementById('heatmap').data[0].z.flat()")
        assert len(cells) == 150_000 and all(round(c, 3) == c for c in cells)

        # A switch redraws in place; the page answers while it does.
        t1 = time.monotonic()
        page.select_option("select[data-param=filter]", "all")
        page.wait_for_function(
            "() => (document.getElementById('trend')?.data?.[2]?.customdata || [])[0] === 300",
            timeout=60_000,
        )
        switch = time.monotonic() - t1
        assert (
            page.evaluate(
                "() => new Promise((ok) => { const t = performance.now();"
                " setTimeout(() => ok(performance.now() - t), 0); })"
            )
            < 500
        )

        # Idle, the page polls one small summary and redraws nothing.
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.wait_for_timeout(9_000)
        heavy = [u for u in requests if "/heatmap" in u or "/trend" in u]
        assert requests and not heavy, requests
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "long-run.png"), full_page=True)

        # The overview flags the over-trained run and passes the long one.
        page.goto(f"{base_url}/#/")
        page.wait_for_selector(f"#gate-{run_id} .badge.pass")
        page.wait_for_selector("tr:has-text('over-trained') .badge.fail")
        assert "alpha 1.500 at step 200 is below 2" in page.inner_text(
            "tr:has-text('over-trained')"
        )
        page.screenshot(path=str(SHOTS / "runs-gate.png"), full_page=True)
        browser.close()
    print(
        f"\nlong run {CHECKPOINTS}x{LAYERS}: plots with data {first_paint:.1f}s, all plots "
        f"{all_plots:.1f}s, filter switch {switch:.1f}s"
    )
    assert not errors, errors
    assert first_paint < 30 and switch < 30
