"""``/metrics`` scrape cost against the number of runs, and the alert path's cost per checkpoint.

Fills a fresh database (PostgreSQL at ``--pg`` when given, else a SQLite file) with N runs of
3 analysed checkpoints of 60 layers each, written by ``results.complete`` with the gate check the
worker passes (so every run has a recorded verdict), then times ``GET /metrics`` through the
app (median of ``--repeat`` scrapes) and counts the SQL statements one scrape issues. Also
times ``results.complete`` with and without the gate check (the work the alerts add to each
analysed checkpoint).

    python bench/bench_metrics.py --runs 10 100 1000
    python bench/bench_metrics.py --pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy
from fastapi.testclient import TestClient
from sqlalchemy import event, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alphawatch.service.api import create_app  # noqa: E402
from alphawatch.service.db import queue, registry, results  # noqa: E402
from alphawatch.service.db.alerts import GateCheck  # noqa: E402
from alphawatch.service.db.migrations import upgrade  # noqa: E402
from alphawatch.service.db.rows import LayerRow  # noqa: E402
from alphawatch.service.db.session import dispose_all, make_engine, session_scope  # noqa: E402
from alphawatch.settings import Settings  # noqa: E402

LAYERS = 60


def _layers(rng: np.random.Generator) -> list[dict[str, Any]]:
    return [
        {
            "name": f"model.layers.{i // 7}.l{i % 7}",
            "kind": "up",
            "block": i // 7,
            "method": "ww",
            "fit_status": "ok" if rng.random() > 0.2 else "poor_fit",
            "trusted": True,
            "correlation_trap": False,
            "rank_collapse": False,
            "alpha": float(rng.uniform(2, 7)),
        }
        for i in range(LAYERS)
    ]


def _fill(
    url: str, runs: int, start: int, check: GateCheck | None, rng: np.random.Generator
) -> list[float]:
    engine = make_engine(url)
    seconds = []
    for r in range(start, start + runs):
        with session_scope(engine) as session:
            run_id = registry.ensure_run(session, name=f"run-{r}", path=f"/runs/{r}")
            for step in (100, 200, 300):
                registry.register_checkpoint(
                    session,
                    run_id=run_id,
                    step=step,
                    path=f"/r/{r}/{step}",
                    fingerprint="x",
                    fmt="hf",
                )
        for _ in range(3):
            with session_scope(engine) as session:
                job = queue.claim(session, worker_id="b", lease_s=60)
            assert job is not None
            layers = [
                LayerRow.from_mapping({**layer, "trusted": layer["fit_status"] == "ok"})
                for layer in _layers(rng)
            ]
            began = time.perf_counter()
            with session_scope(engine) as session:
                results.complete(
                    session,
                    job_id=job.job_id,
                    worker_id="b",
                    layers=layers,
                    spectra=[],
                    device="cpu",
                    elapsed_s=1.0,
                    thresholds=Settings().trust,
                    gate=check,
                )
            seconds.append(time.perf_counter() - began)
    return seconds


def _database(pg: str | None, tmp: Path, name: str) -> str:
    if pg is None:
        url = f"sqlite:///{tmp / f'{name}.db'}"
    else:
        admin = sqlalchemy.create_engine(pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
            conn.execute(text(f"CREATE DATABASE {name}"))
        admin.dispose()
        url = str(
            sqlalchemy.engine.make_url(pg).set(database=name).render_as_string(hide_password=False)
        )
    upgrade(url)
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--pg", type=str, default=None, help="admin URL of a PostgreSQL server")
    args = parser.parse_args()
    print(
        f"python {platform.python_version()}, sqlalchemy {sqlalchemy.__version__}, "
        f"prometheus-client {version('prometheus-client')}, {platform.machine()} "
        f"{platform.system()}, {os.cpu_count()} cpus, database "
        f"{'postgresql' if args.pg else 'sqlite'}"
    )
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        plain = _database(args.pg, Path(tmp), "aw_bench_complete_plain")
        gated = _database(args.pg, Path(tmp), "aw_bench_complete_gated")
        settings = Settings(database_url=gated)
        check = GateCheck(
            defaults=settings.gate, method="ww", thresholds=settings.trust, notify=True
        )
        without: list[float] = []
        with_gate: list[float] = []
        for r in range(30):  # alternated, so both see the same machine load
            without += _fill(plain, 1, r, None, rng)
            with_gate += _fill(gated, 1, r, check, rng)
        print(
            f"results.complete ({LAYERS} layers), median of 90: without gate "
            f"{statistics.median(without) * 1e3:.1f} ms, with gate and alert outbox "
            f"{statistics.median(with_gate) * 1e3:.1f} ms"
        )
        dispose_all()

        url = _database(args.pg, Path(tmp), "aw_bench_metrics")
        filled = 0
        print("| runs | /metrics median (ms) | statements per scrape | bytes |")
        print("|---:|---:|---:|---:|")
        for runs in sorted(args.runs):
            _fill(url, runs - filled, filled, check, rng)
            filled = runs
            statements: list[str] = []

            def count(
                _conn: Any, _cursor: Any, statement: str, *_args: Any, seen: list[str] = statements
            ) -> None:
                seen.append(statement)

            event.listen(make_engine(url), "before_cursor_execute", count)
            with TestClient(create_app(Settings(database_url=url))) as client:
                client.get("/metrics")
                statements.clear()
                body = client.get("/metrics").content
                per_scrape = len(statements)
                times = []
                for _ in range(args.repeat):
                    began = time.perf_counter()
                    client.get("/metrics")
                    times.append(time.perf_counter() - began)
            event.remove(make_engine(url), "before_cursor_execute", count)
            print(f"| {runs} | {statistics.median(times) * 1e3:.1f} | {per_scrape} | {len(body)} |")
            dispose_all()


if __name__ == "__main__":
    main()
