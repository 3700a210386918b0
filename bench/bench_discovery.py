"""Discovery at fleet scale: CPU per steady-state poll, and time to notice a new checkpoint.

Builds a runs x checkpoints tree of small real Hugging Face checkpoints on disk (a safetensors
file, config.json, trainer_state.json), registers every run and every checkpoint as analysed,
then measures:

* in one process, the CPU time (``time.process_time``) of ``Watcher.discover_once()`` when
  nothing changed, after a first pass (the first pass is timed too);
* with ``--workers N`` real ``alphawatch watch`` processes, the CPU all of them spend per poll
  interval (utime + stime from /proc, the analysis child processes not included), measured
  over ``--window`` seconds after the first pass, in all and per worker;
* with those workers running, the seconds from a new checkpoint's last file written to its row
  in the database, by polling, and (where the code has it) after a "scan now" request.

Run it against older code with ``--code DIR`` (a ``git archive`` of that commit): DIR goes
first on ``sys.path`` here and on the workers' ``PYTHONPATH``.

    python bench/bench_discovery.py --runs 50 --checkpoints 200           # ~2 minutes
    python bench/bench_discovery.py --runs 500 --checkpoints 200 --db postgres --workers 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--checkpoints", type=int, default=200, help="per run")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument(
        "--pg",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="admin URL of the PostgreSQL server (a database aw_bench_disc is made)",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--poll", type=float, default=5.0, help="the workers' poll interval")
    p.add_argument("--polls", type=int, default=5, help="steady-state polls timed in-process")
    p.add_argument("--window", type=float, default=30.0, help="seconds of fleet CPU measured")
    p.add_argument("--tree", type=Path, default=Path(tempfile.gettempdir()) / "aw-bench-disc")
    p.add_argument("--code", type=Path, help="import alphawatch from this folder instead")
    p.add_argument(
        "--warmup",
        type=float,
        help="seconds the workers get for start-up and their first pass before "
        "the window (default: from the in-process first pass)",
    )
    p.add_argument("--label", default="after")
    p.add_argument("--no-fleet", action="store_true", help="the in-process figures only")
    return p.parse_args()


ARGS = _parse()
CODE = (ARGS.code or ROOT).resolve()
sys.path.insert(0, str(CODE))

from sqlalchemy import create_engine, insert, inspect, text  # noqa: E402

from alphawatch.service.db.migrations import upgrade  # noqa: E402
from alphawatch.service.db.models import AnalysisJob, Checkpoint, Run  # noqa: E402
from alphawatch.service.db.session import dispose_all  # noqa: E402
from alphawatch.settings import Settings  # noqa: E402
from alphawatch.workers.checkpoints.fingerprints import fingerprint  # noqa: E402
from alphawatch.workers.watcher import Watcher  # noqa: E402


def _safetensors(seed: int) -> bytes:
    """A whole safetensors file of one 8 x 4 float32 matrix, built by hand (no torch)."""
    header = json.dumps(
        {
            "model.layers.0.mlp.up_proj.weight": {
                "dtype": "F32",
                "shape": [8, 4],
                "data_offsets": [0, 128],
            }
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    data = bytes((seed * 7 + i) % 251 for i in range(128))
    return len(header).to_bytes(8, "little") + header + data


def write_checkpoint(folder: Path, step: int) -> None:
    """A Hugging Face checkpoint written in the trainer's order: trainer_state.json last."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(_safetensors(step))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def build_tree(tree: Path, runs: int, per_run: int) -> Path:
    root = tree / f"runs-{runs}x{per_run}"
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    started = time.monotonic()
    for r in range(runs):
        for c in range(per_run):
            write_checkpoint(root / f"run-{r:04d}" / f"checkpoint-{(c + 1) * 100}", (c + 1) * 100)
    done.touch()
    print(f"tree: {runs * per_run} checkpoints written in {time.monotonic() - started:.0f}s")
    return root


def make_database(kind: str, tree: Path) -> str:
    if kind == "sqlite":
        path = tree / "bench.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return f"sqlite:///{path}"
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(ARGS.pg)
    dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('DROP DATABASE IF EXISTS "aw_bench_disc" WITH (FORCE)')
        conn.execute('CREATE DATABASE "aw_bench_disc"')
    return admin.set(database="aw_bench_disc").render_as_string(hide_password=False)


def fill(url: str, root: Path) -> None:
    """Every run registered, every checkpoint registered and analysed (status done)."""
    started = time.monotonic()
    upgrade(url)
    engine = create_engine(url)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            run_id = conn.execute(
                insert(Run)
                .values(name=run_dir.name, path=str(run_dir), created_at=now)
                .returning(Run.id)
            ).scalar()
            rows = [
                {
                    "run_id": run_id,
                    "step": int(c.name.split("-")[1]),
                    "path": str(c),
                    "fingerprint": fingerprint(c),
                    "format": "hf",
                    "status": "done",
                    "discovered_at": now,
                    "finished_at": now,
                    "analysis_count": 1,
                }
                for c in sorted(run_dir.iterdir())
            ]
            ids = conn.execute(insert(Checkpoint).returning(Checkpoint.id), rows).scalars().all()
            conn.execute(
                insert(AnalysisJob),
                [{"checkpoint_id": i, "status": "done", "attempts": 1} for i in ids],
            )
    engine.dispose()
    print(f"database: filled in {time.monotonic() - started:.0f}s")


def settings_for(url: str, root: Path) -> Settings:
    return Settings(
        database_url=url,
        allowed_roots=[root],
        device="cpu",
        settle_s=0.0,
        poll_interval_s=ARGS.poll,
    )


def in_process(url: str, root: Path) -> dict[str, float]:
    watcher = Watcher(settings_for(url, root), worker_id="bench")
    t0, c0 = time.monotonic(), time.process_time()
    new = watcher.discover_once()
    first_cpu, first_wall = time.process_time() - c0, time.monotonic() - t0
    assert new == 0, f"the first pass found {new} new checkpoints: the fill is wrong"
    cpus = []
    for _ in range(ARGS.polls):
        c0 = time.process_time()
        assert watcher.discover_once() == 0
        cpus.append(time.process_time() - c0)
    watcher.engine.dispose()
    dispose_all()
    return {
        "first_pass_cpu_s": first_cpu,
        "first_pass_wall_s": first_wall,
        "poll_cpu_ms_median": 1000 * statistics.median(cpus),
        "poll_cpu_ms_max": 1000 * max(cpus),
    }


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _registered(url: str, path: Path) -> bool:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return (
                conn.execute(
                    text("SELECT count(*) FROM checkpoint WHERE path = :p"), {"p": str(path)}
                ).scalar()
                == 1
            )
    finally:
        engine.dispose()


def _notice(url: str, root: Path, step: int, run: int, request_scan: bool) -> float:
    folder = root / f"run-{run:04d}" / f"checkpoint-{step}"
    write_checkpoint(folder, step)
    written = time.monotonic()
    if request_scan:
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE run SET scan_requested_at = :now WHERE path = :p"),
                {"now": datetime.now(UTC), "p": str(folder.parent)},
            )
        engine.dispose()
    deadline = written + 10 * ARGS.poll + 60
    while not _registered(url, folder):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{folder} was not noticed")
        time.sleep(0.02)
    return time.monotonic() - written


def fleet(url: str, root: Path, first_pass_wall_s: float) -> tuple[dict[str, float], list[float]]:
    env = {
        **os.environ,
        "PYTHONPATH": str(CODE),
        "ALPHAWATCH_ALLOWED_ROOTS": json.dumps([str(root)]),
        "ALPHAWATCH_SETTLE_S": "0",
        "ALPHAWATCH_DEVICE": "cpu",
    }
    logs = root.parent / "workers.log"
    probe = root / f"run-{ARGS.runs - 1:04d}" / "checkpoint-1000000099"
    write_checkpoint(probe, 10**9 + 99)
    with logs.open("wb") as out:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "alphawatch",
                    "watch",
                    "--db",
                    url,
                    "--poll",
                    str(ARGS.poll),
                ],
                env=env,
                stdout=out,
                stderr=out,
                cwd=root.parent,
            )
            for _ in range(ARGS.workers)
        ]
    result: dict[str, float] = {}
    per_process: list[float] = []
    try:
        # Start-up (imports, the analysis process) and the first pass: over once a checkpoint
        # written in the last run before the workers started is registered (the first pass
        # reaches it last), and two polls later.
        longest = (
            ARGS.warmup
            if ARGS.warmup is not None
            else max(60.0, 4 * first_pass_wall_s * ARGS.workers + 2 * ARGS.poll)
        )
        started = time.monotonic()
        while not _registered(url, probe) and time.monotonic() - started < longest:
            time.sleep(1.0)
        time.sleep(2 * ARGS.poll)
        result["warmup_s"] = time.monotonic() - started
        for proc in procs:
            assert proc.poll() is None, logs.read_text(errors="replace")[-3000:]
        before = [_cpu_s(p.pid) for p in procs]
        time.sleep(ARGS.window)
        each = [_cpu_s(p.pid) - b for p, b in zip(procs, before, strict=True)]
        polls = ARGS.window / ARGS.poll
        result["fleet_cpu_ms_per_poll"] = 1000 * sum(each) / polls
        # Per worker, largest first: the first is the lease holder (it discovers).
        per_process = sorted((round(1000 * s / polls, 1) for s in each), reverse=True)
        print(json.dumps({**result, "cpu_ms_per_poll_by_worker": per_process}), flush=True)
        base = 10**9
        latencies = [_notice(url, root, base + i, (i * 37) % ARGS.runs, False) for i in range(3)]
        result["notice_s_mean"] = statistics.mean(latencies)
        result["notice_s_max"] = max(latencies)
        columns = {c["name"] for c in inspect(create_engine(url)).get_columns("run")}
        if "scan_requested_at" in columns:
            pushed = [
                _notice(url, root, base + 10 + i, (i * 53) % ARGS.runs, True) for i in range(3)
            ]
            result["scan_now_s_mean"] = statistics.mean(pushed)
            result["scan_now_s_max"] = max(pushed)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        _remove_new(root)
    return result, per_process


def _remove_new(root: Path) -> None:
    """The checkpoints the notice trials wrote (steps from 10**9 on)."""
    for run in root.iterdir():
        for new in run.glob("checkpoint-1000000*"):
            shutil.rmtree(new)


def main() -> None:
    root = build_tree(ARGS.tree, ARGS.runs, ARGS.checkpoints)
    _remove_new(root)
    url = make_database(ARGS.db, ARGS.tree)
    fill(url, root)
    figures: dict[str, object] = {
        "label": ARGS.label,
        "runs": ARGS.runs,
        "checkpoints": ARGS.runs * ARGS.checkpoints,
        "db": ARGS.db,
        "workers": ARGS.workers,
        "poll_s": ARGS.poll,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_at_start": round(os.getloadavg()[0], 2),
    }
    figures.update({k: round(v, 3) for k, v in in_process(url, root).items()})
    print(json.dumps(figures), flush=True)
    if not ARGS.no_fleet:
        first = float(figures["first_pass_wall_s"])  # type: ignore[arg-type]
        measured, per_worker = fleet(url, root, first)
        figures.update({k: round(v, 3) for k, v in measured.items()})
        figures["cpu_ms_per_poll_by_worker"] = per_worker
        figures["load_avg_at_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
