"""The dashboard's run page of a long run, loaded cold in a real headless chromium.

Fills a PostgreSQL database with one run of 500 checkpoints x 300 layers, exactly as
``bench/bench_api.py`` fills (its functions, imported: the layer rows bulk-loaded with COPY and
the kept statistics made by the ``stat_rows`` that ``results.complete`` uses), then for each
load starts a fresh API process (uvicorn, empty result cache) and a fresh browser, opens
``#/runs/1`` and waits until the page is complete: every visible plot drawn (or saying it has
nothing to draw), the checkpoint table filled and no API request in flight. Prints the time to
complete, and per request the time from the page's start, the time to first byte, the time to
the last byte and the bytes; then, on another fresh API process, each of those requests alone,
one after the other (the API's own cost of each, without the browser's concurrency).

    python bench/bench_runpage.py                     # creates aw_runpage, drops it at the end
    python bench/bench_runpage.py --keep              # keep the database for the next call
    python bench/bench_runpage.py --reuse --keep      # reuse it (no fill)
    python bench/bench_runpage.py --checkpoints 50 --layers 60   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_api import database, fill, libpq, serve

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

# Counts the page's API requests in flight: complete means none is left.
COUNT_FETCHES = """
window.__inflight = 0;
const realFetch = window.fetch.bind(window);
window.fetch = async (...args) => {
  window.__inflight += 1;
  try { const r = await realFetch(...args); await r.clone().arrayBuffer(); return r; }
  finally { window.__inflight -= 1; }
};
// Tasks over 50 ms: those that end when Plotly is defined are Plotly's evaluation.
window.__long = [];
window.__longTasks = new PerformanceObserver((list) => {
  for (const e of list.getEntries()) window.__long.push([e.startTime, e.duration]);
});
window.__longTasks.observe({ type: "longtask", buffered: true });
// When Plotly is defined: how long each plot's drawing took, by element.
window.__draws = [];
let plotly;
Object.defineProperty(window, "Plotly", { configurable: true, get: () => plotly, set: (p) => {
  plotly = p;
  window.__plotlyAt = performance.now();
  const react = p.react.bind(p);
  p.react = (el, ...rest) => {
    const t0 = performance.now();
    const out = react(el, ...rest);
    window.__draws.push([el.id, Math.round(t0), Math.round(performance.now() - t0)]);
    return out;
  };
} });
"""
# Every plot of a visible panel drawn or showing its note, the table filled, nothing in flight.
COMPLETE = """
() => {
  const body = document.getElementById('run-body');
  if (!body || body.hidden || window.__inflight !== 0) return false;
  if (!document.querySelector('#checkpoints tbody tr')) return false;
  if (document.querySelector('#view .panel-error')) return 'failed';
  const plots = [...document.querySelectorAll('#view .plot')]
    .filter((el) => !el.closest('[hidden]'));
  const drawn = plots.length > 0 && plots.every((el) => el.dataset.rendered === '1'
    || el.querySelector('.plot-note'));
  if (drawn && window.__doneAt === undefined) window.__doneAt = performance.now();
  return drawn;
}
"""


def load_page(base: str, run_id: int, timeout_s: float) -> dict[str, Any]:
    """One cold load of the run page: time to complete and its requests."""
    from playwright.sync_api import sync_playwright

    requests: list[dict[str, Any]] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.add_init_script(COUNT_FETCHES)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        def finished(request: Any) -> None:
            if "/api/v1/" not in request.url:
                return
            t = request.timing
            requests.append(
                {
                    "path": unquote(request.url.split("/api/v1", 1)[1]),
                    "start_epoch_ms": t["startTime"],
                    "ttfb_ms": t["responseStart"] - max(t["requestStart"], 0),
                    "done_ms": t["responseEnd"],
                    "bytes": request.sizes()["responseBodySize"],
                }
            )

        page.on("requestfinished", finished)
        page.goto(f"{base}/#/runs/{run_id}")
        origin = page.evaluate("() => performance.timeOrigin")
        state = page.wait_for_function(COMPLETE, polling="raf", timeout=timeout_s * 1000)
        failed_panel = state.json_value() == "failed"
        done_ms = page.evaluate("() => window.__doneAt")
        heat = page.evaluate(
            "() => { const d = document.getElementById('heatmap').data;"
            " return d ? [d[0].z.length, d[0].z[0].length] : null; }"
        )
        # Where the time before the first API request goes: the static files and the document.
        static = page.evaluate(
            "() => [...performance.getEntriesByType('resource')]"
            ".filter((e) => !e.name.includes('/api/v1/'))"
            ".map((e) => [e.name.replace(location.origin, ''), Math.round(e.startTime),"
            " Math.round(e.responseEnd), e.encodedBodySize])"
            ".concat([['(document: DOMContentLoaded end)', 0, Math.round(performance"
            ".getEntriesByType('navigation')[0].domContentLoadedEventEnd), 0]])"
        )
        draws = page.evaluate("() => window.__draws")
        plotly_at = page.evaluate("() => window.__plotlyAt")
        long_tasks = page.evaluate(
            "() => window.__long.concat(window.__longTasks.takeRecords()"
            ".map((e) => [e.startTime, e.duration]))"
        )
        browser.close()
    for r in requests:
        r["start_ms"] = round(r.pop("start_epoch_ms") - origin)
        r["ttfb_ms"] = round(r["ttfb_ms"])
        r["done_ms"] = round(r["start_ms"] + r["done_ms"])
    requests.sort(key=lambda r: r["start_ms"])
    # Durations are whole milliseconds; the script's compilation is the task just before.
    evaluation = 0.0
    chain = [t for t in sorted(long_tasks) if plotly_at and t[0] <= plotly_at <= t[0] + t[1] + 1]
    while chain:
        start, took = chain[-1]
        evaluation += took
        chain = [t for t in long_tasks if abs(t[0] + t[1] - start) <= 1]
    return {
        "complete_ms": round(done_ms),
        "failed_panel": failed_panel,
        "heatmap_cells": heat,
        "errors": errors,
        "static": static,
        "plotly_defined_ms": round(plotly_at or -1),
        "plotly_eval_ms": round(evaluation) if evaluation else None,
        "draws": draws,
        "requests": requests,
    }


def alone(base: str, paths: list[str]) -> list[dict[str, Any]]:
    """Each request once, one after another, on an API process that has answered none."""
    out = []
    with httpx.Client(base_url=f"{base}/api/v1", timeout=120) as client:
        for path in paths:
            t0 = time.perf_counter()
            response = client.get(path)
            ms = 1000 * (time.perf_counter() - t0)
            out.append(
                {
                    "path": path,
                    "ms": round(ms),
                    "bytes": len(response.content),
                    "status": response.status_code,
                }
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--database", default="aw_runpage")
    parser.add_argument("--checkpoints", type=int, default=500)
    parser.add_argument("--layers", type=int, default=300)
    parser.add_argument("--loads", type=int, default=3, help="cold loads, each on a fresh API")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn processes (serve: 1)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--timeout", type=float, default=120, help="seconds per load")
    parser.add_argument("--reuse", action="store_true", help="use an existing filled database")
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    url, reused = database(args.admin_url, args.database, reuse=args.reuse)
    try:
        if not reused:
            fill_s = fill(
                url, 1, args.checkpoints, args.layers, jobs=os.cpu_count() or 2, block_runs=0
            )
            print(f"fill: {fill_s:.0f} s", file=sys.stderr)
        with psycopg.connect(libpq(url)) as conn:
            run_id, n_rows = conn.execute(
                "SELECT (SELECT min(id) FROM run), (SELECT count(*) FROM layer_metric)"
            ).fetchone() or (None, 0)
        base = f"http://127.0.0.1:{args.port}"
        loads = []
        for i in range(args.loads):
            server = serve(url, args.port, args.workers, cache=True)
            try:
                loads.append(load_page(base, run_id, args.timeout))
            finally:
                server.send_signal(signal.SIGINT)
                server.wait(timeout=30)
            last = loads[-1]
            draws = {el: took for el, _, took in last["draws"]}
            print(
                f"load {i + 1}: complete in {last['complete_ms']} ms, Plotly evaluated in"
                f" {last['plotly_eval_ms']} ms, drawn in {sum(draws.values())} ms (heatmap"
                f" {draws.get('heatmap')} ms) (load {os.getloadavg()[0]:.1f})",
                file=sys.stderr,
            )
        server = serve(url, args.port, args.workers, cache=True)
        try:
            solo = alone(base, [r["path"] for r in loads[-1]["requests"]])
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
    finally:
        if not args.keep:
            with psycopg.connect(libpq(args.admin_url), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
    times = [load["complete_ms"] for load in loads]
    evals = [load["plotly_eval_ms"] for load in loads]
    report = {
        "data": {"checkpoints": args.checkpoints, "layers": args.layers, "layer_rows": n_rows},
        "complete_ms": times,
        "complete_median_ms": statistics.median(times),
        "plotly_eval_ms": evals,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "last_load": loads[-1],
        "alone": solo,
    }
    print(f"\nrun page complete, cold: {times} ms (median {statistics.median(times):.0f})")
    print(f"Plotly's evaluation (the task that defines it): {evals} ms")
    print(f"load average: {report['load_avg']}")
    print(f"heatmap cells (rows, columns): {loads[-1]['heatmap_cells']}")
    if loads[-1]["errors"] or loads[-1]["failed_panel"]:
        print(f"PAGE ERRORS: {loads[-1]['errors']} failed panel: {loads[-1]['failed_panel']}")
    print("\nstatic files of the last load (ms from the page's start to start, to end; bytes):")
    for name, start, end, size in loads[-1]["static"]:
        print(f"{start:>6} {end:>6} {size:>9}  {name}")
    print(f"\nPlotly defined at {loads[-1]['plotly_defined_ms']} ms; drawing (start ms, took ms):")
    for el, start, took in loads[-1]["draws"]:
        print(f"{start:>6} {took:>6}  #{el}")
    print("\nrequests of the last load (ms from the page's start; bytes of the body):")
    print(f"{'start':>6} {'ttfb':>6} {'done':>6} {'bytes':>9}  path")
    for r in loads[-1]["requests"]:
        print(
            f"{r['start_ms']:>6} {r['ttfb_ms']:>6} {r['done_ms']:>6} {r['bytes']:>9}  {r['path']}"
        )
    print("\neach request alone, sequentially, on a fresh API (ms, bytes):")
    for r in solo:
        print(f"{r['ms']:>6} {r['bytes']:>9} {r['status']}  {r['path']}")
    print(f"  sum {sum(r['ms'] for r in solo)} ms, {sum(r['bytes'] for r in solo)} bytes")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
