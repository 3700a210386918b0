"""What the integrations cost: the callback per save, and an export, first and repeated.

- Callback: a live API (uvicorn on loopback, SQLite) and ``RunLink``, the part of both training
  callbacks that talks to it: per save one scan request and one gate read (``stop_on_gate``).
  Then the same with the server down: the first failing call, then the calls skipped while
  the link is quiet.
- Export: a synthetic run (``--checkpoints`` x ``--layers`` layer rows written by
  ``results.complete``, so the stored statistics are made as the worker makes them) exported to
  TensorBoard and to MLflow (SQLite store), model level and with every layer, then exported
  again (read back, nothing new to log).

    python bench/bench_integrations.py
    python bench/bench_integrations.py --checkpoints 50 --saves 50   # a quick look
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alphawatch.integrations.export import MlflowTarget, TensorBoardTarget, export_run  # noqa: E402
from alphawatch.integrations.link import RunLink  # noqa: E402
from alphawatch.service.api import create_app  # noqa: E402
from alphawatch.service.db import queue, registry, results  # noqa: E402
from alphawatch.service.db.migrations import upgrade  # noqa: E402
from alphawatch.service.db.rows import LayerRow  # noqa: E402
from alphawatch.service.db.session import make_engine, session_scope  # noqa: E402
from alphawatch.service.db.tokens import TokenScope, create_token  # noqa: E402
from alphawatch.settings import Settings  # noqa: E402
from alphawatch.trust import Thresholds  # noqa: E402
from tests.live import serve  # noqa: E402
from tests.pg import free_port  # noqa: E402

KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def fill(url: str, *, checkpoints: int, layers: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    engine = make_engine(url)
    with session_scope(engine) as session:
        run_id = registry.ensure_run(session, name="bench", path="/runs/bench")
        for i in range(checkpoints):
            registry.register_checkpoint(
                session,
                run_id=run_id,
                step=(i + 1) * 100,
                path=f"/r/{i}",
                fingerprint="x",
                fmt="hf",
            )
    for _ in range(checkpoints):
        with session_scope(engine) as session:
            job = queue.claim(session, worker_id="bench", lease_s=60)
        assert job is not None
        rows = []
        for j in range(layers):
            kind = KINDS[j % len(KINDS)]
            rows.append(
                {
                    "name": f"model.layers.{j // len(KINDS)}.{kind}_proj",
                    "kind": kind,
                    "block": j // len(KINDS),
                    "method": "ww",
                    "fit_status": "ok",
                    "correlation_trap": False,
                    "rank_collapse": False,
                    "trusted": bool(rng.random() > 0.2),
                    "alpha": float(rng.uniform(1.5, 9.0)),
                    "D": 0.05,
                    "num_pl_spikes": 20,
                }
            )
        with session_scope(engine) as session:
            results.complete(
                session,
                job_id=job.job_id,
                worker_id="bench",
                layers=[LayerRow.from_mapping(r) for r in rows],
                spectra=[],
                device="cpu",
                elapsed_s=0.1,
                thresholds=Thresholds(),
            )
    return run_id


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return f"median {statistics.median(ordered) * 1e3:.2f} ms, p95 {p95 * 1e3:.2f} ms"


def bench_callback(tmp: Path, saves: int) -> None:
    url = f"sqlite:///{tmp / 'api.db'}"
    upgrade(url)
    root = tmp / "runs"
    (root / "run").mkdir(parents=True)
    with session_scope(make_engine(url)) as session:
        token = create_token(session, name="bench", scope=TokenScope.WRITE)
    with serve(create_app(Settings(database_url=url, allowed_roots=[root]))) as base:
        link = RunLink(base, token)
        started = time.perf_counter()
        link.start(root / "run")
        register = time.perf_counter() - started
        times = []
        for _ in range(saves):
            started = time.perf_counter()
            link.saved()
            link.gate_failed()
            times.append(time.perf_counter() - started)
    print(
        f"callback, server up: register {register * 1e3:.1f} ms; per save (scan + gate) "
        f"{ms(times)} over {saves} saves"
    )
    down = RunLink(f"http://127.0.0.1:{free_port()}", "x")
    started = time.perf_counter()
    down.start(tmp / "down")
    first = time.perf_counter() - started
    skipped = []
    for _ in range(saves):
        started = time.perf_counter()
        down.saved()
        down.gate_failed()
        skipped.append(time.perf_counter() - started)
    print(
        f"callback, server down: first call {first * 1e3:.2f} ms (one warning), then per "
        f"save {ms(skipped)} (calls skipped for {down.retry_after_s:.0f} s)"
    )


def bench_export(tmp: Path, checkpoints: int, layers: int) -> None:
    url = f"sqlite:///{tmp / 'export.db'}"
    upgrade(url)
    started = time.perf_counter()
    run_id = fill(url, checkpoints=checkpoints, layers=layers)
    print(
        f"export: filled {checkpoints} checkpoints x {layers} layers in "
        f"{time.perf_counter() - started:.1f} s"
    )
    targets = {
        "tensorboard": TensorBoardTarget(tmp / "tb"),
        "mlflow": MlflowTarget(f"sqlite:///{tmp / 'mlflow.db'}"),
    }
    for name, target in targets.items():
        for with_layers in (False, True):
            for attempt in ("first", "again"):
                started = time.perf_counter()
                tracker = target.open("bench")
                with session_scope(make_engine(url)) as session:
                    count = export_run(
                        session=session,
                        run_id=run_id,
                        tracker=tracker,
                        thresholds=Thresholds(),
                        method="ww",
                        layers=with_layers,
                    )
                tracker.close()
                elapsed = time.perf_counter() - started
                print(
                    f"export to {name:<11} {'layers' if with_layers else 'model ':<6} "
                    f"{attempt:<5}: {count:>6} values in {elapsed:6.2f} s"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=200)
    parser.add_argument("--checkpoints", type=int, default=200)
    parser.add_argument("--layers", type=int, default=154, help="layer rows per checkpoint")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import mlflow
    import torch

    print(
        f"machine: {platform.machine()}, {platform.processor() or '?'}; python "
        f"{platform.python_version()}; torch {torch.__version__}; mlflow {mlflow.__version__}"
    )
    with tempfile.TemporaryDirectory() as folder:
        bench_callback(Path(folder), args.saves)
        bench_export(Path(folder), args.checkpoints, args.layers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
