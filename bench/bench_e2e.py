"""End-to-end benchmark: checkpoint-complete -> results served, and one worker's throughput.

    python bench/bench_e2e.py [--db URL] [--device cpu|cuda] [--wide-checkpoints 3]

Measures, for one worker polling a run directory:
- latency from the moment a checkpoint's completion marker appears to the moment the REST API
  serves its layers (target: poll interval + analysis time + < 1 s);
- throughput in checkpoints per minute for the demo model and for a 1024-wide 8-layer
  Llama-shaped model.
Prints a markdown table (paste it into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from fastapi.testclient import TestClient

from alphawatch.service.api import create_app
from alphawatch.service.db.migrations import upgrade
from alphawatch.settings import Settings
from alphawatch.workers.demo_run import train
from alphawatch.workers.watcher import Watcher


def _latency(settings: Settings, source: Path, work: Path) -> list[float]:
    run = work / "live"
    run.mkdir()
    watcher = Watcher(settings, [run])
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run_forever, args=(stop,), daemon=True)
    thread.start()
    latencies: list[float] = []
    with TestClient(create_app(settings)) as client:
        for ckpt in sorted(source.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
            step = int(ckpt.name.split("-")[1])
            tmp = run / f"tmp-checkpoint-{step}"
            shutil.copytree(ckpt, tmp)
            os.replace(tmp, run / ckpt.name)  # the moment the checkpoint becomes complete
            t0 = time.perf_counter()
            while True:
                runs = client.get("/api/v1/runs").json()["runs"]
                if runs:
                    got = client.get(f"/api/v1/runs/{runs[0]['id']}/checkpoints/{step}/layers")
                    if got.status_code == 200 and got.json()["layers"]:
                        break
                time.sleep(0.02)
            latencies.append(time.perf_counter() - t0)
    stop.set()
    thread.join(timeout=60)
    return latencies


def _throughput(settings: Settings, run: Path) -> tuple[int, float]:
    watcher = Watcher(settings, [run])
    t0 = time.perf_counter()
    count = watcher.run_once()
    return count, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="database URL (default: a fresh SQLite file)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--wide-checkpoints", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="alphawatch-bench-"))
    try:

        def fresh_db(name: str) -> str:
            url = args.db or f"sqlite:///{work / name}.db"
            upgrade(url)
            return url

        demo = work / "demo"
        train(demo, steps=60, save_every=10)
        settings = Settings(
            database_url=fresh_db("latency"),
            device=args.device,
            settle_s=0.0,
            poll_interval_s=args.poll,
        )
        latencies = _latency(settings, demo, work)
        demo_n, demo_s = _throughput(
            settings.model_copy(update={"database_url": fresh_db("demo")}), demo
        )

        wide = work / "wide"
        train(
            wide,
            steps=args.wide_checkpoints,
            save_every=1,
            d_model=1024,
            n_layers=8,
            ffn=2752,
            seq_len=16,
            batch_size=2,
            n_heads=8,
        )
        wide_n, wide_s = _throughput(
            settings.model_copy(update={"database_url": fresh_db("wide")}), wide
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}, torch {torch.__version__}, device {args.device}"
    )
    print("| measure | value |\n|---|---|")
    print(f"| poll interval | {args.poll:.1f} s |")
    print(
        f"| complete -> served, demo checkpoint (median of {len(latencies)}) | "
        f"{sorted(latencies)[len(latencies) // 2]:.2f} s |"
    )
    print(f"| complete -> served, worst | {max(latencies):.2f} s |")
    print(f"| demo model (2 x 128-wide blocks): throughput | {60 * demo_n / demo_s:.1f} ckpt/min |")
    print(
        f"| 1024-wide 8-layer Llama shape: throughput | {60 * wide_n / wide_s:.2f} ckpt/min "
        f"({wide_s / max(wide_n, 1):.1f} s per checkpoint) |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
