"""REST API under load: trend and layer history on a large Postgres database.

Fills a dedicated database (default 20 runs x 500 checkpoints x 300 layers = 3 M layer rows,
bulk-loaded with COPY; the per-checkpoint robust statistics are made by the same
``service.db.aggregates.stat_rows`` that ``results.complete`` uses), serves it with uvicorn on
loopback, and drives it with concurrent clients, bounded in requests and time. Prints p50/p99
latency and throughput per endpoint.

    python bench/bench_api.py                      # full size, creates database aw_bench
    python bench/bench_api.py --reuse              # skip the fill when the database is there
    python bench/bench_api.py --runs 2 --checkpoints 50 --layers 60   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alphawatch.service.db.aggregates import block_stat_rows, stat_rows  # noqa: E402
from alphawatch.service.db.migrations import upgrade  # noqa: E402
from alphawatch.service.db.session import dispose_all  # noqa: E402
from alphawatch.trust import Thresholds  # noqa: E402

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
PROJ = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
LAYER_COLUMNS = (
    "checkpoint_id",
    "name",
    "kind",
    "block",
    "dtype",
    "method",
    "fit_status",
    "trusted",
    "rows",
    "cols",
    "num_evals",
    "lambda_max",
    "alpha",
    "alpha_weighted",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "D",
    "pl_xmin",
    "pl_xmax",
    "num_pl_spikes",
    "correlation_trap",
    "rank_collapse",
    "near_random",
    "over_trained",
    "under_trained",
    "mean_spike",
)
# "D" is the one mixed-case column: quoted, as every name may be.
QUOTED_LAYER_COLUMNS = ", ".join(f'"{c}"' for c in LAYER_COLUMNS)
STAT_COLUMNS = (
    "checkpoint_id",
    "method",
    "metric",
    "filter",
    "outliers",
    "kinds",
    "alpha_max",
    "mad_k",
    "n_used",
    "n_excluded",
    "excluded",
    "median",
    "mean",
    "trimmed_mean",
    "p10",
    "p25",
    "p75",
    "p90",
    "iqr",
)
BLOCK_COLUMNS = (*STAT_COLUMNS[:6], "variant", "block", *STAT_COLUMNS[6:])


def layer_names(n: int) -> list[tuple[str, str, int]]:
    names = []
    block = 0
    while len(names) < n:
        for kind in KINDS:
            names.append((f"model.layers.{block}.{PROJ[kind]}", kind, block))
        block += 1
    return names[:n]


def checkpoint_layers(
    checkpoint_id: int, seed: int, step_index: int, names: list[tuple[str, str, int]]
) -> list[dict[str, Any]]:
    """Layer rows of one checkpoint: alpha drifts down with the step, some fits untrusted."""
    rng = np.random.default_rng(seed)
    n = len(names)
    alpha = rng.normal(6.0 - 2.5 * step_index / 500, 0.8, n).clip(1.2, 12.0)
    status = np.where(rng.random(n) < 0.15, "poor_fit", "ok")
    status = np.where(alpha > 8, "alpha_out_of_range", status)
    trap = rng.random(n) < 0.05
    lam = 10 ** rng.normal(2.0, 0.3, n)
    layers = []
    for i, (name, kind, block) in enumerate(names):
        a = float(alpha[i])
        layers.append(
            {
                "checkpoint_id": checkpoint_id,
                "name": name,
                "kind": kind,
                "block": block,
                "dtype": "bfloat16",
                "method": "ww",
                "fit_status": str(status[i]),
                "trusted": bool(status[i] == "ok" and not trap[i]),
                "rows": 4096,
                "cols": 4096,
                "num_evals": 4096,
                "lambda_max": float(lam[i]),
                "alpha": a,
                "alpha_weighted": a * float(np.log10(lam[i])),
                "log_norm": float(rng.normal(3, 0.2)),
                "log_spectral_norm": float(np.log10(lam[i])),
                "stable_rank": float(rng.uniform(5, 80)),
                "D": float(rng.uniform(0.01, 0.2)),
                "pl_xmin": float(lam[i] / 20),
                "pl_xmax": float(lam[i]),
                "num_pl_spikes": int(rng.integers(10, 400)),
                "correlation_trap": bool(trap[i]),
                "rank_collapse": False,
                "near_random": False,
                "over_trained": a < 2,
                "under_trained": a > 6,
                "mean_spike": False,
            }
        )
    return layers


def fill_chunk(args: tuple[str, list[tuple[int, int, int, bool]], int]) -> int:
    """COPY the layer rows and kept statistics (whole model and per block, made by the functions
    ``results.complete`` uses) of a list of (checkpoint id, seed, step index)."""
    dsn, work, n_layers = args
    names = layer_names(n_layers)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY layer_metric ({QUOTED_LAYER_COLUMNS}) FROM STDIN") as lcopy:
            stats: list[dict[str, Any]] = []
            blocks: list[dict[str, Any]] = []
            for checkpoint_id, seed, index, with_blocks in work:
                layers = checkpoint_layers(checkpoint_id, seed, index, names)
                for layer in layers:
                    lcopy.write_row([layer[c] for c in LAYER_COLUMNS])
                stats += stat_rows(layers, checkpoint_id=checkpoint_id, thresholds=Thresholds())
                if with_blocks:
                    blocks += block_stat_rows(
                        layers, checkpoint_id=checkpoint_id, thresholds=Thresholds()
                    )
        with cur.copy(f"COPY checkpoint_stat ({', '.join(STAT_COLUMNS)}) FROM STDIN") as scopy:
            for row in stats:
                scopy.write_row([row[c] for c in STAT_COLUMNS])
        with cur.copy(f"COPY block_stat ({', '.join(BLOCK_COLUMNS)}) FROM STDIN") as bcopy:
            for row in blocks:
                bcopy.write_row([row[c] for c in BLOCK_COLUMNS])
    return len(work)


def libpq(url: str) -> str:
    u = make_url(url)
    return f"host={u.host} port={u.port or 5432} user={u.username} dbname={u.database}"


def fill(url: str, runs: int, checkpoints: int, layers: int, jobs: int, block_runs: int) -> float:
    """Fill the database; ``block_stat`` rows for the first ``block_runs`` runs (0: all)."""
    started = time.perf_counter()
    upgrade(url)
    dispose_all()
    dsn = libpq(url)
    now = datetime.now(UTC)
    work: list[tuple[int, int, int, bool]] = []
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for r in range(runs):
            run_id = cur.execute(
                "INSERT INTO run (name, path, created_at) VALUES (%s, %s, %s) RETURNING id",
                (f"run-{r}", f"/runs/run-{r}", now),
            ).fetchone()
            assert run_id is not None
            with cur.copy(
                "COPY checkpoint (run_id, step, path, fingerprint, format, status, "
                "discovered_at, finished_at, analysis_s, device, n_layers) "
                "FROM STDIN"
            ) as copy:
                for i in range(checkpoints):
                    step = (i + 1) * 100
                    copy.write_row(
                        (
                            run_id[0],
                            step,
                            f"/runs/run-{r}/checkpoint-{step}",
                            "f",
                            "hf",
                            "done",
                            now,
                            now,
                            1.0,
                            "cpu",
                            layers,
                        )
                    )
        rows = cur.execute("SELECT id, run_id, step FROM checkpoint ORDER BY id").fetchall()
        work = [
            (cid, cid, step // 100 - 1, not block_runs or run_id <= block_runs)
            for cid, run_id, step in rows
        ]
    chunks = [work[i : i + 250] for i in range(0, len(work), 250)]
    done = 0
    with ProcessPoolExecutor(jobs) as pool:
        for n in pool.map(fill_chunk, [(dsn, c, layers) for c in chunks]):
            done += n
            print(f"\r  filled {done}/{len(work)} checkpoints", end="", file=sys.stderr)
    print(file=sys.stderr)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def database(admin_url: str, name: str, *, reuse: bool) -> tuple[str, bool]:
    """The URL of database ``name``, and whether an existing one is reused (else it is made
    empty: dropped if it exists, created)."""
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(libpq(admin_url), autocommit=True) as conn:
        exists = (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            is not None
        )
        if exists and not reuse:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        if not (exists and reuse):
            conn.execute(f'CREATE DATABASE "{name}"')
    return url, exists and reuse


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams.

    httpx's async client costs more CPU per request than the endpoints under test (on 32
    connections it tops out near 330 requests/s against a no-op route on this machine), and the
    load generator shares the two cores with the server: a light client keeps the figures about
    the server.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes, bool]:
        """Status, body, and whether the server answered from its result cache."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(line.split(":", 1)[1])
            for line in lines[1:]
            if line.lower().startswith("content-length:")
        )
        hit = any(line.lower() == "x-cache: hit" for line in lines[1:])
        return status, await self.reader.readexactly(length), hit

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(
    base: str,
    paths: list[str],
    clients: int,
    max_requests: int,
    max_seconds: float,
    ordered: bool = False,
) -> dict[str, Any]:
    """``clients`` concurrent loops over ``paths`` until either bound; latencies of 200s.

    Paths are drawn at random, or each once in order with ``ordered``.
    """
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = hits = 0
    deadline = time.perf_counter() + max_seconds
    host, port = base.removeprefix("http://").split(":")

    async def client(seed: int) -> None:
        nonlocal issued, hits
        rng = random.Random(seed)
        connection = Connection(host, int(port))
        try:
            while issued < max_requests and time.perf_counter() < deadline:
                path = paths[issued % len(paths)] if ordered else rng.choice(paths)
                issued += 1
                t0 = time.perf_counter()
                status, _body, hit = await connection.get(path)
                elapsed = time.perf_counter() - t0
                if status == 200:
                    latencies.append(elapsed)
                    hits += hit
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - started
    done = sorted(latencies)

    def pct(q: float) -> float:
        return 1000 * done[min(len(done) - 1, int(q * len(done)))] if done else 0.0

    return {
        "requests": len(done),
        "errors": errors,
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(done) / wall, 1),
        "cache_hits": round(hits / len(done), 3) if done else None,
        "p50_ms": round(pct(0.50), 1),
        "p99_ms": round(pct(0.99), 1),
        "mean_ms": round(1000 * statistics.fmean(done), 1) if done else None,
    }


def serve(url: str, port: int, workers: int, cache: bool) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "ALPHAWATCH_DATABASE_URL": url,
        "PYTHONPATH": str(ROOT),
        "ALPHAWATCH_API_CACHE_MB": "256" if cache else "0",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "alphawatch.service.api:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
        cwd=ROOT,
    )
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("uvicorn did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--database", default="aw_bench")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--checkpoints", type=int, default=500)
    parser.add_argument("--layers", type=int, default=300)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3000, help="per endpoint")
    parser.add_argument("--seconds", type=float, default=60, help="per endpoint")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--only", default="", help="measure only endpoints whose label holds one of these words"
    )
    parser.add_argument(
        "--cache", default="on,off", help="result cache modes to measure: on, off or on,off"
    )
    parser.add_argument(
        "--block-runs",
        type=int,
        default=0,
        help="per-block views of the first N runs, and block_stat rows filled for them (0: all)",
    )
    parser.add_argument("--reuse", action="store_true", help="keep an existing filled database")
    parser.add_argument("--drop", action="store_true", help="drop the database afterwards")
    args = parser.parse_args()

    url, reused = database(args.admin_url, args.database, reuse=args.reuse)
    fill_s = None
    if not reused:
        fill_s = fill(
            url,
            args.runs,
            args.checkpoints,
            args.layers,
            jobs=os.cpu_count() or 2,
            block_runs=args.block_runs,
        )
        print(f"fill: {fill_s:.0f} s", file=sys.stderr)
    with psycopg.connect(libpq(url)) as conn:
        n_runs, n_ckpt, n_layers = conn.execute(
            "SELECT (SELECT count(*) FROM run), (SELECT count(*) FROM checkpoint), "
            "(SELECT count(*) FROM layer_metric)"
        ).fetchone() or (0, 0, 0)
        size = conn.execute(
            "SELECT pg_size_pretty(pg_database_size(current_database()))"
        ).fetchone()
    names = [n for n, _, _ in layer_names(args.layers)]
    rng = random.Random(0)
    trend_paths = [
        f"/api/v1/runs/{r}/trend?metric=alpha&stat=median&filter=trusted"
        for r in range(1, n_runs + 1)
    ]
    trend_kind_paths = [
        f"/api/v1/runs/{r}/trend?metric=alpha&stat=median&filter=trusted&kind=q,k,v,o,qkv"
        for r in range(1, n_runs + 1)
    ]
    block_runs = min(args.block_runs or n_runs, n_runs)
    trend_block_paths = [
        f"/api/v1/runs/{r}/trend?metric=alpha&stat=median&filter=trusted&block_min=0&block_max=9"
        for r in range(1, n_runs + 1)
    ]
    one_block_paths = [
        f"/api/v1/runs/{r}/trend?metric=alpha&stat=median&filter=trusted"
        f"&block_min={b}&block_max={b}"
        for r in range(1, block_runs + 1)
        for b in (0, args.layers // 14, args.layers // 7 - 1)
    ]
    blocks_paths = [
        f"/api/v1/runs/{r}/blocks?metric=alpha&stat=median&filter=trusted&max_points=150"
        for r in range(1, block_runs + 1)
    ]
    history_paths = [
        f"/api/v1/runs/{rng.randint(1, n_runs)}/layers/{rng.choice(names)}/history"
        for _ in range(2000)
    ]
    results: dict[str, Any] = {}
    endpoints = (
        ("trend (whole model, kept statistics)", trend_paths, args.requests),
        ("layer history", history_paths, args.requests),
        ("trend of the attention group (kept statistics)", trend_kind_paths, args.requests),
        ("trend of one block (kept statistics)", one_block_paths, args.requests),
        ("trends of every block, 150 steps (kept statistics)", blocks_paths, args.requests // 10),
        ("trend of blocks 0-9 (from layer rows)", trend_block_paths, max(args.requests // 20, 32)),
    )
    if args.only:
        words = [w.strip() for w in args.only.split(",") if w.strip()]
        endpoints = tuple(e for e in endpoints if any(w in e[0] for w in words))
    base = f"http://127.0.0.1:{args.port}"
    modes = [m.strip() for m in args.cache.split(",")]
    for cache in [m == "on" for m in ("on", "off") if m in modes]:
        mode = "result cache on" if cache else "result cache off"
        server = serve(url, args.port, args.workers, cache)
        try:
            asyncio.run(drive(base, trend_paths[:2] + history_paths[:2], 4, 40, 30))  # warm-up
            for label, paths, n in endpoints:
                if cache:
                    # Steady state of dashboards and CI jobs re-reading runs between two
                    # analysed checkpoints: every URL read before, twice over the clients'
                    # connections so that each uvicorn process (each has its own cache) has
                    # most of them. The "cache off" rows give the cost of every miss.
                    distinct = sorted(set(paths))
                    for _ in range(2):
                        asyncio.run(
                            drive(base, distinct, args.clients, len(distinct), 600, ordered=True)
                        )
                results[f"{label}, {mode}"] = asyncio.run(
                    drive(base, paths, args.clients, n, args.seconds)
                )
                # The machine may be shared: the load beside each figure.
                results[f"{label}, {mode}"]["load_1m"] = round(os.getloadavg()[0], 1)
                print(f"{label}, {mode}", json.dumps(results[f"{label}, {mode}"]), flush=True)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}",
        "postgres": psycopg.connect(libpq(url)).info.server_version,
        "data": {
            "runs": n_runs,
            "checkpoints": n_ckpt,
            "layer_rows": n_layers,
            "database_size": size[0] if size else None,
            "fill_s": fill_s,
        },
        "clients": args.clients,
        "load_average": os.getloadavg(),
        "uvicorn_workers": args.workers,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.drop:
        with psycopg.connect(libpq(args.admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{args.database}" WITH (FORCE)')


if __name__ == "__main__":
    main()
